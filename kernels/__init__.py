"""phi4_kernels: hand-written Triton attention kernels for phi4_nb (installed from `kernels/`)."""
__version__ = "0.1.0"

from .ops import flash_attn_func, flash_attn_varlen_func

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]
