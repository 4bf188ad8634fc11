"""infq.quantizers (see DESIGN.md)."""
