"""infq: LLM quantization and model conversion toolchain (GPTQ, AWQ, FP8, GGUF K-quants).

Importing `infq` is cheap: it imports no torch. Subpackages: cli, quantizers, formats, kernels,
eval, runtime (see DESIGN.md).
"""

__version__ = "0.1.0"
