import os

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

# Triton kernels run on the CPU interpreter when there is no GPU; the flag must be set before any kernel is defined.
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
