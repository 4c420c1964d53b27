"""The one prepared GPU check (`make gpu-check`): the kernel tests on the GPU (bf16 at real sizes), the attention
benchmark (forward and backward, sequence 1K-16K, head dim 128, causal, MHA and 4:1 GQA, against SDPA's backends and
FlexAttention), the model-level check that a few `triton` training steps track `sdpa`'s loss, and the `gpu` preset's
training step time with each. Everything lands as CSV in `reports/data/bench/` (one file per part, named after the
GPU), and the whole run keeps to a time budget: what does not fit is listed as skipped, never silently dropped.

Usage:

    python -m phi4_kernels.gpu_check                  # on a CUDA machine (`make gpu-check` installs what it needs)
    python -m phi4_kernels.gpu_check --cpu --out DIR  # the same plumbing on a CPU (Triton's interpreter, tiny sizes)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQLENS = (1024, 2048, 4096, 8192, 16384)


def write_csv(path: Path, rows: list[dict]) -> Path:
    "Rows as CSV, written to a temporary name and renamed (the union of their keys, in first-seen order)."
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path


class Budget:
    "Seconds left of the run's budget; parts ask before they start."
    def __init__(self, seconds: float): self.end = time.monotonic() + seconds
    def left(self) -> float: return self.end - time.monotonic()


def kernel_tests(out: Path, slug: str, cpu: bool, budget: Budget) -> dict:
    "tests/test_kernels.py under pytest; one row per test (outcome, seconds) from its JUnit report."
    xml = out / f".junit_{slug}.xml"
    sel = [] if not cpu else ["-k", "test_bf16"]                 # on a GPU: every test, compiled; on a CPU: one
    env = {**os.environ, **({"TRITON_INTERPRET": "1"} if cpu else {})}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" /
                        "test_kernels.py"), *sel, f"--junitxml={xml}", "--timeout", str(int(max(60, budget.left())))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(60, budget.left()))
    rows = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None else
                       "skipped" if case.find("skipped") is not None else "passed")
            rows.append(dict(test=case.get("name"), outcome=outcome, seconds=float(case.get("time", 0))))
        xml.unlink()
    write_csv(out / f"gpu_kernel_tests_{slug}.csv", rows)
    failed = [x["test"] for x in rows if x["outcome"] == "failed"]
    return dict(tests=len(rows), failed=failed, seconds=round(time.monotonic() - t0, 1),
                tail=r.stdout[-1500:] if failed or r.returncode not in (0, 5) else "")


def loss_check(out: Path, slug: str, cpu: bool, steps: int = 8) -> dict:
    "A small model's first optimizer steps with `triton` attention against `sdpa`: the two loss curves, step by step."
    import torch
    from phi4_nb.config import get_config
    from phi4_nb.model import Phi4ForCausalLM
    preset, dev = ("tiny", "cpu") if cpu else ("smoke", "cuda")
    cfg = get_config(preset)
    ids = torch.randint(0, cfg.vocab_size, (4, (64 if cpu else 512) + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    curves = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = Phi4ForCausalLM(get_config(preset, attn_implementation=impl)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curves[impl] = []
        for _ in range(steps if not cpu else 2):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=not cpu):
                logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves[impl].append(loss.item())
    rows = [dict(step=i, sdpa=a, triton=b, rel_diff=abs(a - b) / max(1.0, abs(a)))
            for i, (a, b) in enumerate(zip(curves["sdpa"], curves["triton"]))]
    write_csv(out / f"gpu_loss_check_{slug}.csv", rows)
    worst = max(r["rel_diff"] for r in rows)
    return dict(preset=preset, steps=len(rows), max_rel_diff=worst, tracks=worst < 0.02)


def train_step(out: Path, slug: str) -> dict:
    "The `gpu` preset's training step (bf16 autocast, batch 8 x 2048) with each attention setting."
    from phi4_kernels.bench import _e2e_gpu_preset
    res = _e2e_gpu_preset()
    write_csv(out / f"gpu_train_step_{slug}.csv", [dict(attention=k, **v) for k, v in res.items()])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "reports" / "data" / "bench"), help="where the CSVs go")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check (default 7.5 minutes)")
    p.add_argument("--cpu", action="store_true", help="run the plumbing on a CPU: Triton's interpreter, tiny sizes")
    args = p.parse_args(argv)
    if args.cpu and os.environ.get("TRITON_INTERPRET") != "1":   # the package's kernels are defined on import:
        argv = sys.argv[1:] if argv is None else list(argv)       # start again with the interpreter switched on
        os.execve(sys.executable, [sys.executable, "-m", "phi4_kernels.gpu_check", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; --cpu runs the same plumbing on the Triton interpreter", file=sys.stderr)
        return 2
    from phi4_kernels import bench
    out, budget = Path(args.out), Budget(args.budget)
    env = bench._gpu_env() if not args.cpu else dict(device="cpu", torch=torch.__version__)
    slug = "cpu" if args.cpu else bench._device_slug(torch.cuda.get_device_name())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_env_{slug}.json").write_text(json.dumps(env, indent=2))
    summary, skipped = dict(device=env.get("device", slug)), []
    parts = [("kernel_tests", 0.30, lambda: kernel_tests(out, slug, args.cpu, budget)),
             ("loss_check", 0.05, lambda: loss_check(out, slug, args.cpu)),
             ("benchmark", 0.45, lambda: bench.main(
                 (["--interpret"] if args.cpu else ["--seqlens", ",".join(map(str, SEQLENS)), "--head-dims", "128",
                                                    "--causal-only", "--deadline", str(int(budget.left() * 0.75))])
                 + ["--out-dir", str(out)])),
             ("train_step", 0.10, lambda: train_step(out, slug) if not args.cpu else "not on a CPU")]
    for name, share, run in parts:                               # each part needs its share of what is left
        if budget.left() < share * args.budget * 0.5:
            skipped.append(name); continue
        t0 = time.monotonic()
        try: summary[name] = run()
        except Exception as e: summary[name] = dict(error=f"{type(e).__name__}: {e}")
        print(f"[{name}] {time.monotonic() - t0:.0f} s: {json.dumps(summary[name], default=str)[:400]}", flush=True)
    summary["skipped"] = skipped
    (out / f"gpu_check_{slug}.json").write_text(json.dumps(summary, indent=2, default=str))
    bad = lambda v: isinstance(v, dict) and (v.get("error") or v.get("failed"))
    ok = not skipped and not any(bad(v) for v in summary.values())
    print("gpu check:", "all parts ran" if ok else f"incomplete or failing: {json.dumps(summary, default=str)[:800]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
