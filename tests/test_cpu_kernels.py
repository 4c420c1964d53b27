"""The C++ decode-attention kernel of `phi4_kernels.cpu` against a float64 reference.

The kernel is built on first use (about 15 s, then cached on disk). Criterion: its error against the float64
reference is at most twice that of PyTorch's own attention at the same precision, plus a small slack. Cache columns
a row must not see are filled with NaN, so any leak shows.

Run: pytest tests/test_cpu_kernels.py
"""
import pytest
import torch
import torch.nn.functional as F

from phi4_kernels import cpu

torch.set_num_threads(2)
pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernels could not be built here")
SLACK = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _case(B, Hq, Hkv, D, S, col, dtype, seed=0):
    "A query per row, a cache of width S whose columns outside start[b]..col hold NaN, and the visibility mask."
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype).transpose(1, 2)        # (B, Hq, 1, D), a strided view
    k, v = (torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)[:, :, :S] for _ in range(2))   # views of a longer cache
    start = torch.randint(0, col + 1, (B,), generator=g)
    start[0] = 0                                                                # one row with no padding
    cols = torch.arange(S)
    mask = (cols >= start[:, None]) & (cols <= col)                             # (B, S)
    for x in (k, v): x.masked_fill_(~mask[:, None, :, None], float('nan'))
    return q, k, v, start, mask[:, None, None]


def _reference(q, k, v, mask, dtype):
    k0, v0 = (x.masked_fill(~mask.transpose(-1, -2), 0) for x in (k, v))     # NaN times 0 weight is still NaN
    return F.scaled_dot_product_attention(q.to(dtype), k0.to(dtype), v0.to(dtype), attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (8, 2, 32), (4, 4, 128), (6, 1, 48), (2, 2, 8)])
def test_decode_attention_matches_reference(dtype, Hq, Hkv, D):
    q, k, v, start, mask = _case(5, Hq, Hkv, D, S=40, col=33, dtype=dtype)
    ref = _reference(q, k, v, mask, torch.float64)
    torch_err = (_reference(q, k, v, mask, dtype).double() - ref).abs().max().item()
    for vectorized in (True, False):                                            # False: the portable scalar loop
        out = cpu.decode_attention(q, k, v, start, torch.tensor(33), vectorized)
        assert out.shape == (5, Hq, 1, D) and out.dtype == dtype
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + SLACK[dtype], (vectorized, err, torch_err)


def test_decode_attention_single_visible_column_and_full_width():
    q, k, v, start, mask = _case(3, 4, 2, 16, S=12, col=11, dtype=torch.float32)
    start[1] = 11                                                               # sees only its own column: output = v
    out = cpu.decode_attention(q, k, v, start, torch.tensor(11))
    assert torch.allclose(out[1, :, 0], v[1, :, 11].repeat_interleave(2, 0))
    mask[1, ..., :11] = False
    assert torch.allclose(out, _reference(q, k, v, mask, torch.float32), atol=1e-6)


def test_decode_attention_under_torch_compile():
    q, k, v, start, mask = _case(4, 6, 2, 32, S=20, col=17, dtype=torch.float32)
    f = torch.compile(lambda q, k, v, s, c: cpu.decode_attention(q, k, v, s, c) * 2, fullgraph=True)
    assert torch.allclose(f(q, k, v, start, torch.tensor(17)), 2 * _reference(q, k, v, mask, torch.float32), atol=1e-6)


def test_decode_attention_rejects_bad_input():
    q, k, v, start, _ = _case(2, 4, 2, 16, S=10, col=5, dtype=torch.float32)
    col = torch.tensor(5)
    with pytest.raises(RuntimeError, match="q must be"): cpu.decode_attention(q.expand(2, 4, 3, 16), k, v, start, col)
    with pytest.raises(RuntimeError, match="do not fit"): cpu.decode_attention(q[:, :3], k, v, start, col)
    with pytest.raises(RuntimeError, match="share a dtype"): cpu.decode_attention(q, k.double(), v, start, col)
    with pytest.raises(RuntimeError, match="outside the cache"): cpu.decode_attention(q, k, v, start, torch.tensor(10))
    with pytest.raises(RuntimeError, match="contiguous"): cpu.decode_attention(q, k.transpose(2, 3), v.transpose(2, 3), start, col)
    with pytest.raises(RuntimeError, match="float32, bfloat16"): cpu.decode_attention(q.double(), k.double(), v.double(), start, col)
