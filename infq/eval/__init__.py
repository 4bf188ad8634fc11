"""infq.eval (see DESIGN.md)."""
