"""infq.cli (see DESIGN.md)."""
