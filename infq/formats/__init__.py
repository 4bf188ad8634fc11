"""infq.formats (see DESIGN.md)."""
