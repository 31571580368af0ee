"""Small fused kernels for the Decoder's step: RMSNorm, and rotary embedding + KV-cache write.

Why: in a one-token step every PyTorch op is its own launch of ~1-3 us, and the math between the
big matrix products is many such ops: transformers' RMSNorm is 7 (cast, square, mean, add, rsqrt,
multiply, cast) and the rotary embedding with the cache write another ~10, twice per layer. On
CUDA each function below is one Triton launch; elsewhere (CPU, no Triton) it runs the same math in
PyTorch, which is also what the kernels are tested against.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import kernels
from .kernels import HAVE_TRITON, tl, triton


_FAILED: list[str] = []  # a kernel that failed to build or launch here: the PyTorch spelling takes over


def _use_triton(x: Tensor) -> bool:
    """CUDA tensors take the kernels (unless Triton is off); CPU ones too under Triton's interpreter (tests)."""
    return (HAVE_TRITON and not kernels._DISABLE and not _FAILED
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def _give_up(e: Exception) -> None:
    _FAILED.append(f"{type(e).__name__}: {str(e)[:200]}")
    warnings.warn(f"a fused Decoder kernel failed ({_FAILED[-1]}); using PyTorch ops for RMSNorm and rotary",
                  RuntimeWarning, stacklevel=3)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last axis, as transformers' Mixtral RMSNorm
    computes it: statistics in fp32, the normalised row rounded to x's dtype, then scaled."""
    if _use_triton(x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        H = x2.shape[1]
        try:
            with kernels.on_device(x):
                _rms_norm[(x2.shape[0],)](x2, weight, y, H, x2.stride(0), eps, BLOCK=triton.next_power_of_2(H),
                                          num_warps=4 if H <= 4096 else 8)
            return y.view(*x.shape[:-1], H)
        except Exception as e:  # a Triton that cannot build it: the same math in PyTorch
            _give_up(e)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_and_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, K: Tensor, V: Tensor,
                   positions: Tensor) -> Tensor:
    """Rotate q [T, nh*hd] and k [T, nkv*hd] by the rotary rows cos/sin [T, hd] (sin carrying
    rotate_half's signs, see ``Decoder``), write k and v [T, nkv*hd] into the caches K, V
    [nkv, max_len, hd] at ``positions`` [T]; returns the rotated q as [nh, T, hd]."""
    T = q.shape[0]
    nkv, max_len, hd = K.shape
    nh = q.shape[1] // hd
    if _use_triton(q):
        q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
        out = torch.empty(nh, T, hd, dtype=q.dtype, device=q.device)
        try:
            with kernels.on_device(q):
                _rope_cache[(T, nh + nkv)](q, k, v, cos, sin, positions, out, K, V, T, nh, max_len, q.stride(0),
                                           k.stride(0), v.stride(0), cos.stride(0), HD=hd, num_warps=1)
            return out
        except Exception as e:  # a Triton that cannot build it: the same math in PyTorch
            _give_up(e)
    qh = q.view(T, nh, hd).transpose(0, 1)
    kh = k.view(T, nkv, hd).transpose(0, 1)
    half = hd // 2
    qh = qh * cos + torch.roll(qh, half, -1) * sin
    kh = kh * cos + torch.roll(kh, half, -1) * sin
    K.index_copy_(1, positions, kh)
    V.index_copy_(1, positions, v.view(T, nkv, hd).transpose(0, 1))
    return qh


if HAVE_TRITON:

    @triton.jit
    def _rms_norm(x_ptr, w_ptr, y_ptr, H, stride, eps, BLOCK: tl.constexpr):
        """One row per program: fp32 mean of squares, the row rounded to x's dtype, times the weight."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        x = tl.load(x_ptr + row * stride + offs, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        h = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + offs, (w * h).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, K_ptr, V_ptr, T, NH, MAX_LEN,
                    stride_q, stride_k, stride_v, stride_c, HD: tl.constexpr):
        """Program (t, head): query heads 0..NH-1 are rotated into out [NH, T, HD]; the rest are K/V
        heads, whose rotated k and plain v go to the caches at position pos[t]."""
        t = tl.program_id(0)
        hh = tl.program_id(1)
        j = tl.arange(0, HD)
        rj = (j + HD // 2) % HD  # roll by half a head
        c = tl.load(cos_ptr + t * stride_c + j).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_c + j).to(tl.float32)
        if hh < NH:
            base = q_ptr + t * stride_q + hh * HD
            r = tl.load(base + j).to(tl.float32) * c + tl.load(base + rj).to(tl.float32) * s
            tl.store(out_ptr + (hh * T + t) * HD + j, r.to(out_ptr.dtype.element_ty))
        else:
            kh = hh - NH
            base = k_ptr + t * stride_k + kh * HD
            r = tl.load(base + j).to(tl.float32) * c + tl.load(base + rj).to(tl.float32) * s
            p = tl.load(pos_ptr + t).to(tl.int64)
            dst = (kh * MAX_LEN + p) * HD + j
            tl.store(K_ptr + dst, r.to(K_ptr.dtype.element_ty))
            tl.store(V_ptr + dst, tl.load(v_ptr + t * stride_v + kh * HD + j))
