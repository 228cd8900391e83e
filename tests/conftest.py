"""Suite-wide setup: the Triton interpreter is switched on before any Triton kernel is imported,
so the Triton backend serves CPU tensors when a test asks for it."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
