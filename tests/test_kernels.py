"""Correctness of the Triton flash-attention kernels (phi4_kernels) against a float64 eager reference.

On a CPU-only machine the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
on a CUDA machine the same tests run compiled, plus the GPU-only tests at the end (bf16 at real sizes, determinism,
a few training steps of a small model). Criterion, as in flash-attention: the kernel's error against the float64
reference is at most twice the error of PyTorch's own attention computed at the same precision, plus a small slack.

Run: pytest tests/test_kernels.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phi4_kernels
from phi4_kernels import flash_attn_func, flash_attn_varlen_func
from phi4_kernels import flash_attn as fa

torch.set_num_threads(2)
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INTERP = fa.interpreting()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
pytestmark = pytest.mark.skipif(not CUDA and not INTERP, reason="needs a GPU or TRITON_INTERPRET=1")
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


# ---------------------------------------------------------------------------------------------------------------------
# Reference: plain attention in any dtype (float64 for the truth, the test dtype for PyTorch's own error)
# ---------------------------------------------------------------------------------------------------------------------

def ref_attention(q, k, v, causal, scale=None):
    "q (B, Tq, H, D), k/v (B, Tk, Hk, D) -> out (B, Tq, H, D), lse (B, H, Tq); bottom-right causal alignment."
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        s = s.masked_fill(j > i + Tk - Tq, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)  # rows with no visible key
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def ref_varlen(q, k, v, cu_q, cu_k, causal, scale=None):
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, l = ref_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, scale)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _max_err(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), "infinite entries differ (e.g. LSE of fully masked rows)"
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def _check(name, got, truth, torch_lowp, dtype, factor=2.0):
    err = _max_err(got, truth)
    err_pt = _max_err(torch_lowp, truth)
    assert err <= factor * err_pt + SLACK[dtype], f"{name}: kernel error {err:.3e} > {factor} x PyTorch error {err_pt:.3e}"
    return err, err_pt


def _inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]


def _run_case(B, Tq, Tk, H, Hk, D, causal, dtype, backward=True):
    q64, k64, v64, do64 = _inputs([(B, Tq, H, D), (B, Tk, Hk, D), (B, Tk, Hk, D), (B, Tq, H, D)], dtype)
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    leaves_pt = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
    leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
    out, lse = flash_attn_func(*leaves, causal=causal, return_lse=True)
    o64, l64 = ref_attention(*leaves64, causal)
    opt, lpt = ref_attention(*leaves_pt, causal)
    assert out.shape == q64.shape and out.dtype == dtype and lse.shape == (B, H, Tq)
    res = {"out": _check("out", out, o64, opt, dtype), "lse": _check("lse", lse, l64, lpt, dtype)}
    if backward:
        out.backward(do64.to(dtype))
        o64.backward(do64)
        opt.backward(do64.to(dtype))
        for name, a, b, c in zip(("dq", "dk", "dv"), leaves, leaves64, leaves_pt):
            assert a.grad.shape == b.shape and a.grad.dtype == dtype
            res[name] = _check(name, a.grad, b.grad, c.grad, dtype)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# Dense layout
# ---------------------------------------------------------------------------------------------------------------------

LOWP = torch.float16
DENSE_CASES = [
    # B, Tq, Tk, H, Hk, D, causal, dtype
    (2, 37, 37, 4, 2, 16, True, LOWP),       # ragged length, batch > 1, GQA 2
    (1, 100, 100, 4, 1, 32, False, LOWP),    # GQA 4, non-causal, several blocks
    (2, 100, 100, 4, 4, 64, True, torch.float32),  # MHA
    (1, 37, 100, 2, 1, 32, True, LOWP),      # seqlen_q < seqlen_k (bottom-right causal)
    (1, 100, 37, 4, 2, 16, True, torch.float32),  # seqlen_q > seqlen_k: the first rows see no key
    (1, 37, 100, 2, 2, 64, False, LOWP),     # cross-length, non-causal
    (2, 1, 37, 4, 1, 32, True, LOWP),        # single query row (decode-like)
    (1, 50, 50, 2, 1, 24, True, torch.float32),   # head dim that is not a power of two
    (1, 64, 64, 2, 1, 128, True, LOWP),      # head dim 128, exact block multiple
    (1, 20, 20, 40, 10, 16, True, LOWP),     # phi-4's 40/10 head layout
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hk,D,causal,dtype", DENSE_CASES)
def test_dense_matches_reference(B, Tq, Tk, H, Hk, D, causal, dtype):
    _run_case(B, Tq, Tk, H, Hk, D, causal, dtype)


def test_bf16():
    _run_case(1, 50, 50, 4, 2, 32, True, torch.bfloat16)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
def test_unequal_block_sizes(blocks, monkeypatch):
    "Causal block skipping when query and key tiles differ (interpreter tile sizes are configurable)."
    if not INTERP:
        pytest.skip("tile sizes are only overridable under the interpreter")
    monkeypatch.setitem(fa.INTERPRET_CONFIG, "fwd", blocks)
    monkeypatch.setitem(fa.INTERPRET_CONFIG, "bwd_dkdv", blocks)
    monkeypatch.setitem(fa.INTERPRET_CONFIG, "bwd_dq", blocks)
    _run_case(1, 45, 70, 2, 1, 16, True, torch.float32)
    _run_case(1, 70, 45, 2, 1, 16, True, torch.float32)


def test_tma_path(monkeypatch):
    "The opt-in path that loads tiles through tensor descriptors (TMA on Hopper) passes the same checks."
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90+")
    import triton
    if not (hasattr(fa.tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")):
        pytest.skip("this Triton has no in-kernel tensor descriptors")
    monkeypatch.setattr(fa, "USE_TMA", True)
    q, k, v = _inputs([(1, 45, 4, 32), (1, 70, 2, 32), (1, 70, 2, 32)], torch.float32, seed=12)
    assert fa._tma_ok(q.float(), k.float(), v.float())
    _run_case(2, 45, 70, 4, 2, 32, True, torch.float32)
    _run_case(1, 70, 45, 2, 1, 16, False, torch.float32)
    _run_varlen([30, 0, 15, 45], [30, 4, 15, 45], 2, 1, 16, True, torch.float32)


def test_softmax_scale_and_layout():
    "An explicit scale, and non-contiguous (B, H, T, D)-transposed inputs as the model passes them."
    q, k, v = _inputs([(1, 4, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32)], torch.float32, seed=3)
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) views, not contiguous
    assert not qt.is_contiguous()
    out = flash_attn_func(qt, kt, vt, causal=True, softmax_scale=0.3)
    ref, _ = ref_attention(qt.double(), kt.double(), vt.double(), True, scale=0.3)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_float64_gradcheck():
    q, k, v = _inputs([(1, 9, 2, 16), (1, 9, 1, 16), (1, 9, 1, 16)], torch.float64, seed=5)
    args = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attn_func(a, b, c, causal=True), args, fast_mode=True)


def test_outlier_inputs_stay_finite():
    "Large-magnitude scores (FA3's outlier distribution) keep the online softmax finite and accurate."
    q, k, v = _inputs([(1, 64, 2, 32), (1, 64, 2, 32), (1, 64, 2, 32)], torch.float32, seed=7)
    g = torch.Generator().manual_seed(8)
    q = q + 10.0 * (torch.rand(q.shape, generator=g, dtype=torch.float64) < 0.01).to(q) * torch.randn(
        q.shape, generator=g, dtype=torch.float64).to(q)
    out, lse = flash_attn_func(q.float(), k.float(), v.float(), causal=False, return_lse=True)
    ref, rlse = ref_attention(q, k, v, False)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() < 1e-4
    assert (lse.double() - rlse).abs().max().item() < 1e-4


def test_bad_inputs():
    q = torch.zeros(1, 8, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_func(q, torch.zeros(1, 8, 3, 16, device=DEV), torch.zeros(1, 8, 3, 16, device=DEV))
    with pytest.raises(ValueError, match="4-D"):
        flash_attn_func(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="dtype"):
        flash_attn_func(q, q.half(), q)
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 8], device=DEV), torch.tensor([0, 8], device=DEV), 8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Packed documents (varlen)
# ---------------------------------------------------------------------------------------------------------------------

def _run_varlen(lens_q, lens_k, H, Hk, D, causal, dtype):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q64, k64, v64, do64 = _inputs([(tq, H, D), (tk, Hk, D), (tk, Hk, D), (tq, H, D)], dtype, seed=11)
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    leaves_pt = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
    leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
    out, lse = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True)
    assert out.shape == (tq, H, D) and lse.shape == (H, tq)
    o64, l64 = ref_varlen(*leaves64, cu_q, cu_k, causal)
    opt, lpt = ref_varlen(*leaves_pt, cu_q, cu_k, causal)
    res = {"out": _check("out", out, o64, opt, dtype), "lse": _check("lse", lse, l64, lpt, dtype)}
    out.backward(do64.to(dtype))
    o64.backward(do64)
    opt.backward(do64.to(dtype))
    for name, a, b, c in zip(("dq", "dk", "dv"), leaves, leaves64, leaves_pt):
        res[name] = _check(name, a.grad, b.grad, c.grad, dtype)
    return res


def test_varlen_packed_documents():
    "Self-attention over five packed documents of different lengths (as pretraining packing produces)."
    lens = [5, 37, 1, 64, 20]
    _run_varlen(lens, lens, 4, 2, 32, True, LOWP)


def test_varlen_cross_lengths_and_empty_docs():
    _run_varlen([3, 0, 17, 40], [10, 6, 17, 50], 2, 1, 16, True, torch.float32)
    _run_varlen([3, 0, 17, 40], [10, 6, 17, 50], 2, 2, 16, False, torch.float32)


def test_varlen_matches_dense_batch():
    "Equal-length documents packed give exactly the dense result."
    q, k, v = (t.float() for t in _inputs([(2, 33, 4, 16), (2, 33, 1, 16), (2, 33, 1, 16)], torch.float32, seed=2))
    dense = flash_attn_func(q, k, v, causal=True)
    cu = torch.tensor([0, 33, 66], dtype=torch.int32, device=DEV)
    packed = flash_attn_varlen_func(q.reshape(66, 4, 16), k.reshape(66, 1, 16), v.reshape(66, 1, 16), cu, cu, 33, 33)
    torch.testing.assert_close(packed.view(2, 33, 4, 16), dense, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom op: tracing with torch.compile, opcheck
# ---------------------------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    q, k, v = (t.float().requires_grad_() for t in _inputs([(1, 24, 4, 16), (1, 24, 2, 16), (1, 24, 2, 16)],
                                                             torch.float32, seed=4))

    def f(q, k, v):
        return (flash_attn_func(q * 2.0, k, v, causal=True) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(q, k, v)
    gc = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    ge = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_torch_compile_varlen():
    q, k, v = (t.float() for t in _inputs([(30, 2, 16), (30, 1, 16), (30, 1, 16)], torch.float32, seed=6))
    cu = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEV)
    f = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 18, 18, causal=True)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v))


def test_opcheck():
    q, k, v = (t.float() for t in _inputs([(1, 16, 2, 16), (1, 16, 1, 16), (1, 16, 1, 16)], torch.float32, seed=9))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    torch.library.opcheck(torch.ops.phi4_kernels.flash_attn_fwd.default, (q, k, v, None, None, 16, 16, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------------------------
# The model's `triton` attention setting
# ---------------------------------------------------------------------------------------------------------------------

def test_model_triton_matches_sdpa():
    "The tiny model gives the same logits and gradients with attn_implementation='triton' as with 'sdpa',\
 for plain rows and for rows packed with several documents."
    phi_config = pytest.importorskip("phi4_nb.config")
    phi_model = pytest.importorskip("phi4_nb.model")
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEV)
    packed = torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)])[None].expand(2, 40).to(DEV)
    for pos in (None, packed):
        res = {}
        for impl in ("sdpa", "triton"):
            torch.manual_seed(0)
            model = phi_model.Phi4ForCausalLM(phi_config.get_config("tiny", attn_implementation=impl)).to(DEV)
            logits = model(ids, position_ids=pos)
            logits.float().square().mean().backward()
            res[impl] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(res["triton"][0], res["sdpa"][0], rtol=1e-4, atol=1e-4)
        for a, b in zip(res["triton"][1], res["sdpa"][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Memory bounds: every tensor placed against an inaccessible page, so any out-of-bounds load or store faults
# ---------------------------------------------------------------------------------------------------------------------

_GUARDED = r"""
import ctypes, math, mmap, sys
import torch
from phi4_kernels import flash_attn as fa

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE, KEEP, WHERE = mmap.PAGESIZE, [], ["after"]

def guarded(shape, dtype):
    "Zeroed tensor whose last byte is followed ('after') or whose first byte is preceded ('before') by a PROT_NONE page."
    shape = tuple(int(s) for s in shape)
    n = max(1, math.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    pages = -(-n // PAGE)
    m = mmap.mmap(-1, (pages + 1) * PAGE)
    anchor = (ctypes.c_char * len(m)).from_buffer(m)
    base = ctypes.addressof(anchor)
    guard, off = (base + pages * PAGE, pages * PAGE - n) if WHERE[0] == "after" else (base, PAGE)
    assert libc.mprotect(guard, PAGE, 0) == 0, ctypes.get_errno()
    KEEP.append((m, anchor))
    return torch.frombuffer(m, dtype=torch.uint8, count=n, offset=off).view(dtype)[:math.prod(shape)].view(shape)

class GuardedTorch:
    "torch as the launchers see it: the buffers they allocate (out, lse, delta, dq, dk, dv) are guarded too."
    def __getattr__(self, name):
        return getattr(torch, name)
    def empty(self, size, dtype=None, device=None):
        return guarded(size, dtype)
    def empty_like(self, t, dtype=None, memory_format=None):
        return guarded(t.shape, dtype or t.dtype)

fa.torch = GuardedTorch()

def copy(t):
    out = guarded(t.shape, t.dtype)
    out.copy_(t)
    return out

def run(shapes, dtype, causal, lens=None, transposed=False):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (copy(torch.randn(s, generator=g).to(dtype)) for s in shapes)
    if transposed:  # (B, H, T, D) storage seen as (B, T, H, D), as the model passes it
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    cu_q = cu_k = None
    if lens:
        cu_q, cu_k = (copy(torch.tensor([0] + list(torch.tensor(l).cumsum(0)), dtype=torch.int32)) for l in lens)
        mq, mk = max(lens[0]), max(lens[1])
    else:
        mq, mk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5
    out, lse = fa.attn_fwd(q, k, v, cu_q, cu_k, mq, mk, causal, scale)
    grads = fa.attn_bwd(do, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal, scale)
    assert all(torch.isfinite(t).all() for t in (out, *grads))

f16, f32 = torch.float16, torch.float32
for where in ("after", "before"):
    WHERE[0] = where
    run([(2, 37, 4, 16), (2, 37, 2, 16), (2, 37, 2, 16), (2, 37, 4, 16)], f16, True)        # ragged, GQA 2
    run([(1, 50, 2, 24), (1, 50, 1, 24), (1, 50, 1, 24), (1, 50, 2, 24)], f32, True)        # padded head dim
    run([(1, 70, 2, 16), (1, 45, 1, 16), (1, 45, 1, 16), (1, 70, 2, 16)], f32, True)        # first rows see nothing
    run([(1, 37, 2, 64), (1, 100, 2, 64), (1, 100, 2, 64), (1, 37, 2, 64)], f16, False)     # cross-length
    run([(1, 4, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32), (1, 4, 40, 32)], f32, True, transposed=True)
    run([(60, 2, 16), (83, 1, 16), (83, 1, 16), (60, 2, 16)], f32, True, lens=([3, 0, 17, 40], [10, 6, 17, 50]))
    fa.INTERPRET_CONFIG.update(fwd=(16, 32), bwd_dkdv=(32, 16), bwd_dq=(16, 32))           # unequal tiles
    run([(1, 45, 2, 16), (1, 70, 1, 16), (1, 70, 1, 16), (1, 45, 2, 16)], f32, True)
    fa.INTERPRET_CONFIG.update(fwd=(32, 32), bwd_dkdv=(32, 32), bwd_dq=(32, 32))
print("in bounds")
"""


def test_no_out_of_bounds_access():
    "Forward and backward on ragged lengths, GQA, a padded head dim, a transposed layout and packed documents, with\
 every input and output tensor ending right before (then starting right after) a PROT_NONE page: an access past\
 either end faults instead of reading whatever the heap holds there. Run in a subprocess, so a fault is a failure."
    if not INTERP:
        pytest.skip("guard pages are for host memory: the interpreter runs the kernels on CPU tensors")
    r = subprocess.run([sys.executable, "-c", _GUARDED], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "in bounds" in r.stdout, f"exit {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------------------------------
# Importing the source directory a second time, as top-level `kernels`
# ---------------------------------------------------------------------------------------------------------------------

def test_repository_root_holds_no_package_named_kernels():
    "transformers imports `kernels` while loading a checkpoint, to look for the Hub package of that name: with the\
 repository root on sys.path it must not find a folder of ours (the kernels live in `phi4_kernels/`)."
    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); s = importlib.util.find_spec('kernels'); "
            "print('none' if s is None else s.origin)")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip().startswith(str(root)), r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark script: the CPU code path (tiny interpreted run) works and writes its CSV
# ---------------------------------------------------------------------------------------------------------------------

def test_bench_interpret_smoke(tmp_path):
    if CUDA:
        pytest.skip("the GPU benchmark is exercised by running it")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "phi4_kernels.bench", "--interpret", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    csvs = list(tmp_path.glob("attention_*.csv"))
    assert len(csvs) == 1
    lines = csvs[0].read_text().strip().splitlines()
    assert lines[0].startswith("device,") and len(lines) == 4  # header + triton, triton_tma, sdpa_math
    assert "triton" in r.stdout
    r2 = subprocess.run([sys.executable, "-m", "phi4_kernels.bench", "--out-dir", str(tmp_path)],
                        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                        timeout=300)
    assert r2.returncode != 0 and "GPU" in (r2.stdout + r2.stderr)


def test_hopper_compile():
    "The kernels compile for sm_90 (without a GPU), pipeline their loads and use wgmma; forward and dQ do not spill."
    import json
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is missing")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "phi4_kernels.compile_check", "--json", "--head-dims", "128"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3
    for row in rows:
        assert row["wgmma"] > 0 and row["mma_sync"] == 0, row
        assert row["cp_async"] > 0, row  # software-pipelined loads
        if "stack" in row and row["kind"] != "bwd_dkdv":
            assert row["stack"] == 0, row
    r = subprocess.run([sys.executable, "-m", "phi4_kernels.compile_check", "--json", "--head-dims", "128",
                        "--tma"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for row in (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")):
        assert row["tma"] > 0 and row["wgmma"] > 0, row  # bulk tensor copies
        if "stack" in row:  # no pointer tensors: dK/dV spills little or nothing (0 B on Triton 3.9, 64 B on 3.6)
            assert row["stack"] <= (128 if row["kind"] == "bwd_dkdv" else 0), row


# ---------------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, T, H, Hk, D, causal
    (2, 1024, 8, 2, 128, True),
    (2, 1024, 8, 8, 128, False),
    (1, 2048, 16, 4, 64, True),
    (2, 1000, 8, 2, 128, True),  # ragged
]


@gpu
@pytest.mark.parametrize("B,T,H,Hk,D,causal", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(B, T, H, Hk, D, causal, dtype):
    _run_case(B, T, T, H, Hk, D, causal, dtype)


@gpu
def test_gpu_varlen_real_sizes():
    _run_varlen([300, 1024, 17, 700], [300, 1024, 17, 700], 8, 2, 128, True, torch.bfloat16)


@gpu
def test_gpu_backward_deterministic():
    q, k, v, do = (t.bfloat16() for t in _inputs([(2, 1024, 8, 128), (2, 1024, 2, 128), (2, 1024, 2, 128),
                                                   (2, 1024, 8, 128)], torch.bfloat16))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attn_func(*leaves, causal=True).backward(do)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@gpu
def test_gpu_training_tracks_sdpa():
    "A few optimizer steps of a small model with attn_implementation='triton' follow the 'sdpa' loss curve."
    phi_config = pytest.importorskip("phi4_nb.config")
    phi_model = pytest.importorskip("phi4_nb.model")
    vocab = phi_config.get_config("smoke").vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 257), generator=g).cuda()
    curves = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = phi_model.Phi4ForCausalLM(phi_config.get_config("smoke", attn_implementation=impl)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[impl] = losses
    for a, b in zip(curves["sdpa"], curves["triton"]):
        assert abs(a - b) < 0.02 * max(1.0, abs(a)), curves


def test_gpu_check_plumbing_on_cpu(tmp_path):
    "`make gpu-check` on a CPU: every part runs on Triton's interpreter at tiny sizes and writes its CSV."
    if CUDA:
        pytest.skip("on a GPU the check itself is run")
    r = subprocess.run([sys.executable, "-m", "phi4_kernels.gpu_check", "--cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("gpu_kernel_tests_cpu.csv", "gpu_loss_check_cpu.csv", "attention_interpret.csv", "gpu_check_cpu.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert json.loads((tmp_path / "gpu_check_cpu.json").read_text())["loss_check"]["tracks"]
