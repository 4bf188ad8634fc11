"""infq.runtime (see DESIGN.md)."""
