"""phi4_kernels: hand-written attention kernels for phi4_nb: flash attention in Triton, decode attention in C++ for
CPUs (`phi4_kernels.cpu`)."""
__version__ = "0.1.0"

try:
    from .ops import flash_attn_func, flash_attn_varlen_func
    __all__ = ["flash_attn_func", "flash_attn_varlen_func"]
except ModuleNotFoundError as _e:  # no Triton: the C++ CPU kernels in phi4_kernels.cpu still work
    if _e.name != "triton": raise
    __all__ = []
