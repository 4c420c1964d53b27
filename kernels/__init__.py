"""phi4_kernels: hand-written attention kernels for phi4_nb (installed from `kernels/`): flash attention in Triton,
decode attention in C++ for CPUs (`phi4_kernels.cpu`)."""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _loaded_copy():
    """This package when it is already imported under another name, else None.

    The source directory is also importable as a top-level `kernels` package whenever the repository root is on
    `sys.path` (transformers, for one, runs `import kernels` while loading a checkpoint to look for the Hugging Face
    package of that name). A second copy would define the torch.library ops again, which tears down the first
    copy's registration and leaves its op handles pointing at freed memory: its next call crashes the process."""
    here = _os.path.realpath(__file__)
    for name, mod in list(_sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if name != __name__ and isinstance(f, str) and _os.path.realpath(f) == here and hasattr(mod, "__all__"):
            return name, mod
    return None


_copy = _loaded_copy()
if _copy is not None:  # alias this name (and its submodules) to the copy already loaded: one set of ops per process
    for _sub in ("flash_attn", "ops", "cpu"):
        if f"{_copy[0]}.{_sub}" in _sys.modules: _sys.modules[f"{__name__}.{_sub}"] = _sys.modules[f"{_copy[0]}.{_sub}"]
    _sys.modules[__name__] = _copy[1]
else:
    try:
        from .ops import flash_attn_func, flash_attn_varlen_func
        __all__ = ["flash_attn_func", "flash_attn_varlen_func"]
    except ModuleNotFoundError as _e:  # no Triton: the C++ CPU kernels in phi4_kernels.cpu still work
        if _e.name != "triton": raise
        __all__ = []
