"""Public entry points: torch.library custom ops (traceable by torch.compile) with registered autograd."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .flash_attn import attn_bwd, attn_fwd

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


# --------------------------------------------------------------------------------------------------------------------
# Custom ops. One forward op and one backward op serve both layouts: packed (varlen) calls pass cu_seqlens tensors,
# dense calls pass None.
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("phi4_kernels::flash_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool,
            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)
    return out, lse


@torch.library.custom_op("phi4_kernels::flash_attn_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            max_seqlen_q: int, max_seqlen_k: int, causal: bool,
            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                    softmax_scale)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
              softmax_scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.meta = (max_q, max_k, causal, scale)


def _backward(ctx, dout, dlse):
    # The LSE output is returned for inspection only; gradients flowing into it are not propagated.
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale = ctx.meta
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("phi4_kernels::flash_attn_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# flash-attn compatible functions
# --------------------------------------------------------------------------------------------------------------------

def _scale(q, softmax_scale):
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    return float(softmax_scale)


def flash_attn_func(q: torch.Tensor,  # (batch, seqlen_q, heads, head_dim)
                    k: torch.Tensor,  # (batch, seqlen_k, kv_heads, head_dim); heads % kv_heads == 0
                    v: torch.Tensor,  # same shape as k
                    causal: bool = True,  # causal mask aligned to the bottom-right corner
                    softmax_scale: float | None = None,  # defaults to 1/sqrt(head_dim)
                    return_lse: bool = False,  # also return the log-sum-exp, (batch, heads, seqlen_q) float32
                    ):
    "Fused attention on (batch, seqlen, heads, head_dim) tensors; returns the output in q's layout."
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attn_func expects 4-D (batch, seqlen, heads, head_dim) tensors, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    out, lse = _fwd_op(q, k, v, None, None, q.shape[1], k.shape[1], bool(causal), _scale(q, softmax_scale))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q: torch.Tensor,  # (total_q, heads, head_dim), documents packed back to back
                           k: torch.Tensor,  # (total_k, kv_heads, head_dim)
                           v: torch.Tensor,  # same shape as k
                           cu_seqlens_q: torch.Tensor,  # int32 (batch + 1,), prefix sums of query lengths
                           cu_seqlens_k: torch.Tensor,  # int32 (batch + 1,), prefix sums of key lengths
                           max_seqlen_q: int,  # longest query length
                           max_seqlen_k: int,  # longest key length
                           causal: bool = True,
                           softmax_scale: float | None = None,
                           return_lse: bool = False,  # also return the log-sum-exp, (heads, total_q) float32
                           ):
    "Fused attention over packed variable-length sequences (flash-attn varlen layout)."
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"flash_attn_varlen_func expects 3-D (total_tokens, heads, head_dim) tensors, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
            raise ValueError(f"{name} must be a 1-D int32 tensor")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different batch sizes: "
                         f"{cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1}")
    out, lse = _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
                       _scale(q, softmax_scale))
    return (out, lse) if return_lse else out
