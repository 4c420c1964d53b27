"""CPU kernels in C++, compiled on first use with torch's extension builder (a C++ compiler, as torch.compile needs).

`decode_attention` is single-query attention over a left-padded KV cache: the attention of one decoding step.
For each (row, KV head) it reads that head's keys once and its values once, for all the query heads of the group,
with no mask tensor (the visible columns are `start[b] .. col`)."""
from __future__ import annotations

import os
import threading
import warnings

import torch

__all__ = ["available", "decode_attention"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cpp")
_lock = threading.Lock()
_state: dict = {}


def _flags() -> list:
    "The vector ISA torch.compile would use on this CPU, as compiler flags."
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        isa = pick_vec_isa()
        return [f"-D{m}" for m in isa.build_macro()] + isa.build_arch_flags().split() if isa else []
    except Exception:  # an unknown CPU or a torch without inductor: portable code (ATen's scalar vectors)
        return []


def available() -> bool:
    "Build and load the kernels once per process; False (with one warning) when they cannot be built."
    if "ok" in _state: return _state["ok"]
    with _lock:
        if "ok" in _state: return _state["ok"]
        try:
            from torch.utils.cpp_extension import load
            try:  # torch runs `ninja` from PATH; the pip package's binary is not on it outside an activated virtualenv
                import ninja
                if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
                    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
            load("phi4_kernels_cpu", [_SRC], extra_cflags=["-O3", "-fopenmp", *_flags()], extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
            if not hasattr(torch.ops.phi4_kernels_cpu, "decode_attention"):
                raise RuntimeError("the library registered no op")
            torch.library.register_fake("phi4_kernels_cpu::decode_attention")(
                lambda q, k, v, start, col, vectorized=True: q.new_empty(q.shape))
            _state["ok"] = True
        except Exception as e:
            warnings.warn(f"the C++ CPU kernels could not be built ({type(e).__name__}: {e}); "
                          "using PyTorch's attention")
            _state["ok"] = False
    return _state["ok"]


def decode_attention(q: torch.Tensor,  # (B, Hq, 1, D), head dimension contiguous
                     k: torch.Tensor, v: torch.Tensor,  # (B, Hkv, W, D) caches (views are fine)
                     start: torch.Tensor,  # (B,) long: first visible column of every row
                     col: torch.Tensor,  # 0-d long: the query's column (last visible)
                     vectorized: bool = True,  # False: the portable scalar loop (for tests)
                     ) -> torch.Tensor:  # (B, Hq, 1, D)
    "Softmax attention of one query per row over cache columns `start[b] .. col`, scaled by 1/sqrt(D)."
    if not available(): raise RuntimeError("the C++ CPU kernels are not available (see the warning above)")
    return torch.ops.phi4_kernels_cpu.decode_attention(q, k, v, start, col, vectorized)


def bench(shapes=((32, 9, 3, 64, 30), (32, 8, 2, 32, 6)), widths=(80, 128), dtypes=(torch.bfloat16, torch.float32),
          repeats: int = 7) -> list:
    """Milliseconds per decode step (all layers) of `decode_attention`, PyTorch's fused attention and two matrix
    multiplies, measured alternately in one run."""
    import time
    import torch.nn.functional as F
    if not available(): raise RuntimeError("the C++ CPU kernels are not available")
    rows, g = [], torch.Generator().manual_seed(0)
    for (B, Hq, Hkv, D, L) in shapes:
        for dt in dtypes:
            q = [torch.randn(B, Hq, 1, D, generator=g).to(dt) for _ in range(L)]
            kv = [torch.randn(2, B, Hkv, max(widths) + 16, D, generator=g).to(dt) for _ in range(L)]
            start = torch.randint(0, 8, (B,), generator=g)
            for w in widths:
                col, cols = w - 1, torch.arange(w)
                mask = ((cols <= col) & (cols >= start[:, None]))[:, None, None]
                ks, vs = [x[0, :, :, :w] for x in kv], [x[1, :, :, :w] for x in kv]
                def matmuls(a, k, v):                           # two batched matrix multiplies and a float32 softmax
                    s = (a.view(B, Hkv, Hq // Hkv, D) @ k.transpose(-1, -2)).float() * D ** -0.5
                    return (s.masked_fill(~mask, float("-inf")).softmax(-1).to(dt) @ v).view(B, Hq, 1, D)
                sdpa = lambda a, k, v: F.scaled_dot_product_attention(a, k, v, attn_mask=mask, enable_gqa=True)
                runs = {"sdpa": lambda: [sdpa(a, k, v) for a, k, v in zip(q, ks, vs)],
                        "matmul": lambda: [matmuls(a, k, v) for a, k, v in zip(q, ks, vs)],
                        "kernel": lambda: [decode_attention(a, k, v, start, torch.tensor(col))
                                           for a, k, v in zip(q, ks, vs)]}
                t = {n: [] for n in runs}
                for _ in range(repeats):
                    for n, f in runs.items():
                        t0 = time.perf_counter(); f(); t[n].append(time.perf_counter() - t0)
                med = {n: sorted(x)[len(x) // 2] * 1e3 for n, x in t.items()}
                rows.append(dict(batch=B, heads=Hq, kv_heads=Hkv, head_dim=D, layers=L,
                                 dtype=str(dt).replace("torch.", ""), width=w, sdpa_ms=round(med["sdpa"], 3),
                                 matmul_ms=round(med["matmul"], 3),
                                 kernel_ms=round(med["kernel"], 3), vs_sdpa=round(med["sdpa"] / med["kernel"], 2),
                                 vs_matmul=round(med["matmul"] / med["kernel"], 2)))
    return rows


if __name__ == "__main__":  # python -m phi4_kernels.cpu [--csv reports/data/bench/cpu_decode_attention.csv]
    import argparse
    import csv
    ap = argparse.ArgumentParser(description="time decode_attention against PyTorch's attention on this CPU")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = bench(repeats=args.repeats)
    for r in rows: print(r)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["threads"])
            w.writeheader()
            for r in rows: w.writerow({**r, "threads": torch.get_num_threads()})
