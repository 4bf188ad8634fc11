"""infq.kernels (see DESIGN.md)."""
