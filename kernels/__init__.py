"""phi4_kernels: hand-written Triton attention kernels for phi4_nb (installed from `kernels/`)."""
__version__ = "0.1.0"
