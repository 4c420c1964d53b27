"""Attention benchmark: phi4_kernels vs PyTorch SDPA (flash, efficient, cuDNN) and FlexAttention, in one run.

Usage (on a CUDA machine):

    python -m phi4_kernels.bench            # full sweep: seqlen 512..16384, head dim 64/128, causal or not, MHA/GQA
    python -m phi4_kernels.bench --quick    # a few shapes, for a fast look
    python -m phi4_kernels.bench --e2e           # also time a training step of the `gpu` preset model, sdpa vs triton

FLOPs follow the flash-attention convention: forward 4*b*h*s^2*d (halved when causal), backward 2.5x forward,
counted with the number of query heads. Times are medians of `triton.testing.do_bench`. Results go to
reports/data/bench/attention_<device>.csv (rewritten atomically after every shape, so a cut-off run keeps its rows).
Without a GPU the script exits with a message; `--interpret` runs one tiny shape on the Triton CPU interpreter to
check the code path.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

FIELDS = ["device", "torch", "triton", "impl", "batch", "seqlen", "heads", "kv_heads", "head_dim", "causal", "dtype",
          "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "note"]
IMPLS = ["triton", "triton_tma", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex"]


def attention_flops(batch: int, seqlen_q: int, seqlen_k: int, heads: int, head_dim: int, causal: bool,
                    mode: str = "fwd") -> float:
    "Counted FLOPs of one attention call (query heads; causal halves; backward is 2.5x forward)."
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        f /= 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def _write_csv_atomic(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in FIELDS})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


_KEY = ("impl", "batch", "seqlen", "heads", "kv_heads", "head_dim", "causal", "dtype")


def _row_key(r: dict) -> tuple:
    return tuple(str(r.get(k, "")) for k in _KEY)


def _previous_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    "Earlier rows whose shape/implementation was not re-measured, then the new rows."
    fresh = {_row_key(r) for r in new}
    return [r for r in old if _row_key(r) not in fresh] + new


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "device"


def _gpu_env() -> dict:
    "Driver-reported power limit and clocks (they move results by 10-25%), plus library versions."
    import torch
    import triton
    env = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    try:
        q = ("name,power.limit,power.max_limit,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,"
             "driver_version")
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        if r.returncode == 0:
            first = r.stdout.strip().splitlines()[0]
            env["nvidia_smi"] = dict(zip(q.split(","), [s.strip() for s in first.split(",")]))
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return env


# ---------------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------------

def _bench(fn: Callable, interpret: bool, grad_to_none=None, rep_ms: int = 100) -> float:
    "Median milliseconds per call."
    if interpret:
        fn()
        ts = []
        for _ in range(2):
            for t in grad_to_none or []:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")


def _make_impl(name: str, kernels, causal: bool, T: int, H: int, Hk: int, device: str):
    """Returns (fn(q, k, v) -> out, layout, note) where layout is 'bthd' or 'bhtd', or raises if unavailable."""
    import torch
    import torch.nn.functional as F
    if name == "triton":
        return (lambda q, k, v: kernels.flash_attn_func(q, k, v, causal=causal)), "bthd", ""
    if name == "triton_tma":  # forward K/V through TMA descriptors (opt-in path)
        from phi4_kernels import flash_attn as fa

        def run(q, k, v):
            old, fa.USE_TMA = fa.USE_TMA, True
            try:
                return kernels.flash_attn_func(q, k, v, causal=causal)
            finally:
                fa.USE_TMA = old
        return run, "bthd", "forward loads via TMA descriptors"
    if name.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}[name]
        gqa = H != Hk

        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return run, "bhtd", ""
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, B=None, H=None, Q_LEN=T, KV_LEN=T,
                                     device=device)
        gqa = H != Hk
        return (lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=gqa)), "bhtd", ""
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS + ['sdpa_math']}")


def bench_shape(kernels, impl: str, B: int, T: int, H: int, Hk: int, D: int, causal: bool, dtype, device: str,
                interpret: bool = False, backward: bool = True) -> dict:
    "Time forward and backward of one implementation at one shape; errors become a note instead of a crash."
    import torch
    row = dict(impl=impl, batch=B, seqlen=T, heads=H, kv_heads=Hk, head_dim=D, causal=causal,
               dtype=str(dtype).replace("torch.", ""))
    try:
        fn, layout, note = _make_impl(impl, kernels, causal, T, H, Hk, device)
        g = torch.Generator(device=device).manual_seed(0)

        def make(hk):
            shape_q, shape_kv = ((B, T, H, D), (B, T, hk, D)) if layout == "bthd" else ((B, H, T, D), (B, hk, T, D))
            return [torch.randn(s, device=device, dtype=dtype, generator=g).requires_grad_(backward)
                    for s in (shape_q, shape_kv, shape_kv)]
        q, k, v = make(Hk)
        if impl.startswith("sdpa") and H != Hk:
            try:
                with torch.no_grad():
                    fn(q, k, v)
            except RuntimeError:  # this backend has no native GQA: give it K/V already repeated (not timed)
                fn, _, _ = _make_impl(impl, kernels, causal, T, H, H, device)
                q, k, v = make(H)
                note = "K/V expanded to all heads (no native GQA)"
        with torch.no_grad():
            fwd_ms = _bench(lambda: fn(q, k, v), interpret)
        row["fwd_ms"] = round(fwd_ms, 4)
        row["fwd_tflops"] = _sig(attention_flops(B, T, T, H, D, causal) / fwd_ms / 1e9)
        if backward:
            out = fn(q, k, v)
            dout = torch.randn_like(out)
            bwd_ms = _bench(lambda: out.backward(dout, retain_graph=True), interpret, grad_to_none=[q, k, v])
            row["bwd_ms"] = round(bwd_ms, 4)
            row["bwd_tflops"] = _sig(attention_flops(B, T, T, H, D, causal, "bwd") / bwd_ms / 1e9)
        row["note"] = note
    except Exception as e:  # an SDPA backend that refuses a shape, out of memory, a compile failure ...
        row["note"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------------------------------

def sweep_shapes(quick: bool = False, tokens: int = 16384, hidden: int = 2048) -> list[tuple]:
    """(B, T, H, Hk, D, causal) shapes: the FA3-paper sweep (16k tokens per batch, hidden 2048) for MHA and 4:1 GQA,
    plus phi-4's attention (40 query heads, 10 KV heads, head dim 128, causal)."""
    seqlens = [1024, 4096, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    dims = [128] if quick else [64, 128]
    out = []
    for D in dims:
        H = hidden // D
        for causal in (True, False):
            for Hk in (H, H // 4):
                for T in seqlens:
                    out.append((max(tokens // T, 1), T, H, Hk, D, causal))
    for T in ([4096] if quick else [4096, 8192, 16384]):
        out.append((max(tokens // T, 1), T, 40, 10, 128, True))
    return out


def _print_table(rows: list[dict], file=sys.stdout):
    key = lambda r: (r["batch"], r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"])
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    hdr = f"{'B':>3} {'T':>6} {'H/Hk':>7} {'D':>4} {'causal':>6} {'impl':>15} {'fwd TF/s':>9} {'bwd TF/s':>9} " \
          f"{'fwd/flash':>9} {'bwd/flash':>9}  note"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for k, by_impl in groups.items():
        ref = by_impl.get("sdpa_flash", {})
        for impl, r in by_impl.items():
            def ratio(field):
                a, b = r.get(field), ref.get(field)
                ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                return f"{a / b:9.2f}" if ok else f"{'-':>9}"
            fmt = lambda x: f"{x:9.4g}" if isinstance(x, (int, float)) else f"{'-':>9}"
            print(f"{k[0]:>3} {k[1]:>6} {f'{k[2]}/{k[3]}':>7} {k[4]:>4} {str(k[5]):>6} {impl:>15} "
                  f"{fmt(r.get('fwd_tflops'))} {fmt(r.get('bwd_tflops'))} {ratio('fwd_tflops')} {ratio('bwd_tflops')}  "
                  f"{r.get('note', '')}", file=file)


# ---------------------------------------------------------------------------------------------------------------------
# End-to-end: training-step time of a model under two attention settings
# ---------------------------------------------------------------------------------------------------------------------

def time_training_step(model_factory: Callable[[str], "torch.nn.Module"],  # attention setting -> fresh model on GPU
                       batch,  # model input, e.g. a (B, T) LongTensor of token ids on the model's device
                       settings: Iterable[str] = ("sdpa", "triton"),  # attention settings to compare
                       loss_fn: Callable | None = None,  # (model, batch) -> scalar loss; default next-token CE
                       steps: int = 10,  # timed optimizer steps per setting
                       warmup: int = 3,  # untimed steps first (compilation, autotuning)
                       amp_dtype=None,  # e.g. torch.bfloat16 to run the forward under autocast
                       ) -> dict[str, dict]:
    """Median wall time of forward + backward + optimizer step for each attention setting, measured in one process.
    Returns {setting: {"step_ms", "tokens_per_s", "peak_mem_gib", "loss"}} (and "error" when a setting fails)."""
    import torch
    import torch.nn.functional as F

    def default_loss(model, ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss_fn = loss_fn or default_loss
    results = {}
    for s in settings:
        try:
            torch.manual_seed(0)
            model = model_factory(s)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times, loss = [], None
            for i in range(warmup + steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda" if cuda else "cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            ntok = batch.numel() if hasattr(batch, "numel") else float("nan")
            results[s] = dict(step_ms=round(ms, 3), tokens_per_s=round(ntok / ms * 1e3, 1),
                              peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                              loss=round(float(loss), 5))
            del model, opt
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:
            results[s] = dict(error=f"{type(e).__name__}: {e}")
    return results


def _e2e_gpu_preset(seqlen: int = 2048, batch: int = 8) -> dict:
    "Training-step time, tokens/s and MFU of phi4_nb's `gpu` preset with sdpa vs triton attention (bf16 autocast)."
    import torch
    from phi4_nb.config import get_config
    from phi4_nb.model import Phi4ForCausalLM
    cfg0 = get_config("gpu")
    T = min(seqlen, cfg0.max_position_embeddings)
    ids = torch.randint(0, cfg0.vocab_size, (batch, T + 1), device="cuda")
    factory = lambda s: Phi4ForCausalLM(get_config("gpu", attn_implementation=s)).cuda()
    res = time_training_step(factory, ids, amp_dtype=torch.bfloat16)
    from phi4_nb.config import flops_per_token
    from phi4_nb.train import PEAK_FLOPS                  # dense bf16 peak of known devices
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    for r in res.values():                                # MFU from the config's training FLOPs per token
        if peak and r.get("tokens_per_s"): r["mfu"] = round(flops_per_token(cfg0, T) * r["tokens_per_s"] / peak, 4)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small sweep (head dim 128, three lengths)")
    p.add_argument("--interpret", action="store_true", help="one tiny shape on the Triton CPU interpreter (smoke test)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    p.add_argument("--seqlens", default="", help="comma-separated sequence lengths (overrides the sweep's)")
    p.add_argument("--head-dims", default="", help="comma-separated head dims (overrides the sweep's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-bwd", action="store_true", help="forward only")
    p.add_argument("--causal-only", action="store_true", help="only causal shapes")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds after which the sweep stops; the shapes left are written as skipped rows")
    p.add_argument("--e2e", action="store_true", help="also time a training step of the gpu preset (sdpa vs triton)")
    p.add_argument("--out-dir", default=None, help="where the CSV goes (default reports/data/bench)")
    p.add_argument("--append", action="store_true",
                   help="keep rows of an earlier run in the CSV (rows of the shapes measured now are replaced), "
                        "so a sweep can be split over several invocations")
    args = p.parse_args(argv)

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton defines any kernel
    import torch
    if not args.interpret and not torch.cuda.is_available():
        print("phi4_kernels.bench: no CUDA GPU found; the benchmark needs one. "
              "Use --interpret for a tiny CPU smoke run of the code path.", file=sys.stderr)
        return 2
    import phi4_kernels as kernels
    import triton

    root = Path(__file__).resolve().parents[1]
    out_dir = Path(args.out_dir) if args.out_dir else root / "reports" / "data" / "bench"
    impls = [s for s in args.impls.split(",") if s]
    if args.interpret:
        device, dtype, dev_name = "cpu", torch.float32, "interpret"
        shapes = [(1, 64, 2, 1, 32, True)]
        impls = ["triton", "triton_tma", "sdpa_math"]
    else:
        device, dtype, dev_name = "cuda", getattr(torch, args.dtype), torch.cuda.get_device_name()
        shapes = sweep_shapes(args.quick)
        if args.seqlens:
            keep = {int(s) for s in args.seqlens.split(",")}
            shapes = [s for s in shapes if s[1] in keep] or \
                [(max(16384 // T, 1), T, 2048 // D, 2048 // D // g, D, c) for T in sorted(keep)
                 for D in (64, 128) for c in (True, False) for g in (1, 4)]
        if args.head_dims:
            keep = {int(s) for s in args.head_dims.split(",")}
            shapes = [s for s in shapes if s[4] in keep]
        if args.causal_only:
            shapes = [s for s in shapes if s[5]]
    env = _gpu_env() if device == "cuda" else dict(torch=torch.__version__, triton=triton.__version__, device="cpu")
    print(json.dumps(env), flush=True)
    slug = _device_slug(dev_name)
    csv_path = out_dir / f"attention_{slug}.csv"
    rows = []
    kept = _previous_rows(csv_path) if args.append else []
    t_start = time.monotonic()
    for shape in shapes:
        B, T, H, Hk, D, causal = shape
        for impl in impls:
            if args.deadline and time.monotonic() - t_start > args.deadline:   # out of time: say so, per row
                r = dict(impl=impl, batch=B, seqlen=T, heads=H, kv_heads=Hk, head_dim=D, causal=causal,
                         dtype=str(dtype).replace("torch.", ""), note="skipped: time budget")
            else:
                r = bench_shape(kernels, impl, B, T, H, Hk, D, causal, dtype, device, interpret=args.interpret,
                                backward=not args.no_bwd)
            r.update(device=dev_name, torch=torch.__version__, triton=triton.__version__)
            rows.append(r)
            print(f"  {impl:>15} B={B} T={T} H={H}/{Hk} D={D} causal={causal}: fwd {r.get('fwd_tflops', '-')} "
                  f"bwd {r.get('bwd_tflops', '-')} TFLOP/s {r.get('note', '')}", flush=True)
        _write_csv_atomic(csv_path, _merge(kept, rows))
    if device == "cuda":
        (out_dir / f"attention_{slug}_env.json").write_text(json.dumps(env, indent=2))
    print()
    _print_table(rows)
    print(f"\nwrote {csv_path}")
    if args.e2e and device == "cuda":
        res = _e2e_gpu_preset()
        print("end-to-end training step (gpu preset):", json.dumps(res))
        tmp = out_dir / f"train_step_{slug}.json.tmp"
        tmp.write_text(json.dumps(dict(env=env, results=res), indent=2))
        os.replace(tmp, out_dir / f"train_step_{slug}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
