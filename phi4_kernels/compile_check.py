"""Compile the attention kernels for a GPU architecture without a GPU and report what the compiler made of them.

    python -m phi4_kernels.compile_check                 # default tiles, head dims 64 and 128, sm_90 (Hopper)
    python -m phi4_kernels.compile_check --all --arch 90 # every autotune candidate

For each kernel it prints registers per thread, stack bytes (non-zero means register spills), shared memory, and
whether the loads are software-pipelined (cp.async) and the matmuls use Hopper's wgmma. Needs Triton's bundled
ptxas/cuobjdump, not a GPU. Must run without TRITON_INTERPRET (the script clears it before importing Triton).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)


def _kernels_module():
    from phi4_kernels import flash_attn
    return flash_attn


def _signature(fn, consts, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = "*" + dtype
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("CU_Q", "CU_K"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _divisibility(fn, consts):
    "What the JIT infers at launch for contiguous tensors with head dim 64/128: pointers and strides divisible by 16."
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name not in consts and (name.isupper() or name.startswith("stride_"))}


def compile_kernel(kind: str, head_dim: int, causal: bool, varlen: bool, cfg, arch: int = 90, dtype: str = "bf16",
                   tma: bool = False):
    "Compile one kernel for `sm_<arch>`; returns a dict of compiler facts."
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fa = _kernels_module()
    fn = dict(fwd=fa._fwd_kernel, bwd_dkdv=fa._bwd_dkdv_kernel, bwd_dq=fa._bwd_dq_kernel)[kind]
    bm, bn, warps, stages = cfg
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=bm, BLOCK_N=bn,
                  CAUSAL=causal, VARLEN=varlen, UPCAST=False, ACC=tl.float32, PREC="tf32")
    consts["TMA"] = bool(tma)
    src = ASTSource(fn, _signature(fn, consts, dtype), constexprs=consts, attrs=_divisibility(fn, consts))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = k.asm["ptx"]
    out = dict(kind=kind, head_dim=head_dim, causal=causal, varlen=varlen, config=list(cfg), shared=k.metadata.shared,
               wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
               cp_async=ptx.count("cp.async") - ptx.count("cp.async.bulk"), tma=ptx.count("cp.async.bulk.tensor"))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if tool.exists():
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "k.cubin"
            path.write_bytes(k.asm["cubin"])
            res = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", res, re.S)
        if m:
            out.update(registers=int(m.group(1)), stack=int(m.group(2)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = Hopper)")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--kinds", default="fwd,bwd_dkdv,bwd_dq")
    p.add_argument("--all", action="store_true", help="every autotune candidate, not only the default tile")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--varlen", action="store_true")
    p.add_argument("--tma", action="store_true", help="forward with tensor-descriptor (TMA) loads")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    fa = _kernels_module()
    failed = 0
    for d in (int(x) for x in args.head_dims.split(",")):
        for kind in args.kinds.split(","):
            bd = fa._dim_class(max(16, 1 << (d - 1).bit_length()))
            cfgs = fa._SPACE[kind][bd] if args.all else [fa._default_config(kind, d)]
            for cfg in cfgs:
                try:
                    r = compile_kernel(kind, d, not args.non_causal, args.varlen, cfg, args.arch, tma=args.tma)
                except Exception as e:  # report and go on
                    failed += 1
                    r = dict(kind=kind, head_dim=d, config=list(cfg), error=f"{type(e).__name__}: {e}"[:500])
                print(json.dumps(r) if args.json else
                      "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
