"""Small fused kernels for the Decoder's step: RMSNorm, rotary embedding + KV-cache write, the
router's top-k, the weighted sum of expert outputs, and the wait of a streamed step for its experts.

Why: in a one-token step every PyTorch op is its own kernel launch (with a gap between kernels even
inside a CUDA graph), and the math between the big matrix products is many such ops:
transformers' RMSNorm is 7 (cast, square, mean, add, rsqrt, multiply, cast), the rotary embedding
with the cache write another ~10, the router ~8 (linear, cast, softmax, top-k, sum, divide) and
the weighted sum of the experts' outputs ~5. With offloaded experts these kernels sit between one
layer's last expert copy and the next layer's first, while the copy engine idles. On CUDA each
function below is one Triton launch; elsewhere (CPU, no Triton) it runs the same math in PyTorch,
which is also what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .capability import CAPABILITIES, HAVE_TRITON, interpreting, on_device, tl, triton


def _use_triton(x: Tensor) -> bool:
    """CUDA tensors take the kernels (unless they failed on that device); CPU ones too under Triton's
    interpreter (tests)."""
    return HAVE_TRITON and (x.is_cuda or interpreting()) and CAPABILITIES.works(x.device, "fused")


def _give_up(x: Tensor, e: Exception) -> None:
    CAPABILITIES.fail(x.device, "fused", e)


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
            with on_device(x):
                rms_norm_kernel[(x2.shape[0],)](x2, weight, y, H, x2.stride(0), eps, BLOCK=triton.next_power_of_2(H),
                                          num_warps=4 if H <= 4096 else 8)
            return y.view(*x.shape[:-1], H)
        except Exception as e:  # a Triton that cannot build it: the same math in PyTorch
            _give_up(x, e)
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
            with on_device(q):
                rope_cache_kernel[(T, nh + nkv)](q, k, v, cos, sin, positions, out, K, V, T, nh, max_len, q.stride(0),
                                           k.stride(0), v.stride(0), cos.stride(0), HD=hd, num_warps=1)
            return out
        except Exception as e:  # a Triton that cannot build it: the same math in PyTorch
            _give_up(q, e)
    qh = q.view(T, nh, hd).transpose(0, 1)
    kh = k.view(T, nkv, hd).transpose(0, 1)
    half = hd // 2
    qh = qh * cos + torch.roll(qh, half, -1) * sin
    kh = kh * cos + torch.roll(kh, half, -1) * sin
    K.index_copy_(1, positions, kh)
    V.index_copy_(1, positions, v.view(T, nkv, hd).transpose(0, 1))
    return qh


def route_topk(x: Tensor, weight: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Mixtral's router on x [T, H] with gate weight [E, H]: (top-k weights fp32 [T, k], expert ids
    int64 [T, k]), the weights being the top-k softmax probabilities renormalised to sum to 1. With
    ``weight`` None, x holds the router logits [T, E] themselves (e.g. random ones, for benchmarks)."""
    if _use_triton(x):
        x2 = x if x.stride(-1) == 1 else x.contiguous()
        T = x2.shape[0]
        E = x2.shape[1] if weight is None else weight.shape[0]
        wts = torch.empty(T, k, dtype=torch.float32, device=x.device)
        ids = torch.empty(T, k, dtype=torch.int64, device=x.device)
        try:
            with on_device(x):
                route_topk_kernel[(T,)](x2, x2 if weight is None else weight, wts, ids, x2.shape[1], E, x2.stride(0),
                                  HAS_W=weight is not None, K=k, KP=triton.next_power_of_2(k),
                                  BE=max(2, triton.next_power_of_2(E)), BH=256, num_warps=4)
            return wts, ids
        except Exception as e:  # a Triton that cannot build it: the same math in PyTorch
            _give_up(x, e)
    logits = x if weight is None else F.linear(x, weight)
    top = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return top.values / top.values.sum(dim=-1, keepdim=True), top.indices


def weighted_sum(y: Tensor, weights: Tensor, cols: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``sum over s, i of y[s, i] * weights[cols[i]]`` -> [1, H] in ``dtype``: the expert outputs
    y [S, n, H] (S partial sums of a split-K launch, n experts) weighted by their router weights.
    ``cols`` (int32 [n], on the device) picks each expert's column of ``weights``; None: column i."""
    dtype = dtype or y.dtype
    S, n, H = y.shape
    if _use_triton(y) and y.is_contiguous() and weights.is_contiguous():
        out = torch.empty(1, H, dtype=dtype, device=y.device)
        try:
            with on_device(y):
                weighted_sum_kernel[(triton.cdiv(H, 1024),)](y, weights, weights if cols is None else cols, out, S, n, H,
                                                       HAS_COLS=cols is not None, BLOCK=1024, num_warps=4)
            return out
        except Exception as e:  # a Triton that cannot build it: the same math in PyTorch
            _give_up(y, e)
    w = weights.reshape(-1) if cols is None else weights.reshape(-1).index_select(0, cols)
    return (y.float() * w.view(1, n, 1).float()).sum((0, 1)).view(1, H).to(dtype)


# a count of polls, not a time: on the H200 test machine 2^27 polls ran out in under 40 s, before the host's
# 60 s timeout (streamed.SERVE_TIMEOUT_S); a slower GPU polls for longer
WAIT_SPINS = 1 << 27


def wait_slots(ids: Tensor, row: Tensor, flags: Tensor, max_spins: int = WAIT_SPINS) -> Tensor:
    """The GPU buffers int32 [k] of experts ``ids`` [k] read from ``row`` [E] (int32; -1: not loaded),
    once every one of them is loaded: the kernel polls ``row`` until then, which the host fills in
    (a copy behind the experts' own) while a CUDA graph of the whole step runs (:mod:`..streamed`).

    ``flags`` int32 [2]: a nonzero ``flags[0]`` ends the wait at once (the host gave up on the step);
    a wait that ends with an expert still missing (that, or ``max_spins`` polls) sets ``flags[1]``
    and returns buffer 0 for it, so the step finishes, with output nobody may use (the streamed
    Decoder does not read ``flags[1]`` yet: such a step's logits would be used). Triton only (a
    CUDA device, or Triton's interpreter in tests): streamed steps need it.
    """
    k = ids.numel()
    out = torch.empty(k, dtype=torch.int32, device=ids.device)
    with on_device(ids):
        wait_slots_kernel[(1,)](ids, row, flags, out, max_spins, K=k, KP=max(2, triton.next_power_of_2(k)),
                                num_warps=1)
    return out


if HAVE_TRITON:

    @triton.jit
    def route_topk_kernel(x_ptr, w_ptr, wout_ptr, iout_ptr, H, E, stride_x, HAS_W: tl.constexpr, K: tl.constexpr,
                    KP: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr):
        """One row per program: logits (x @ W.T in fp32, rounded to x's dtype as F.linear returns
        them), softmax, then K rounds of "take the largest" (lowest id on ties), renormalised."""
        row = tl.program_id(0)
        e = tl.arange(0, BE)
        em = e < E
        if HAS_W:
            acc = tl.zeros((BE, BH), dtype=tl.float32)
            for h0 in range(0, H, BH):
                hh = h0 + tl.arange(0, BH)
                hm = hh < H
                xv = tl.load(x_ptr + row * stride_x + hh, mask=hm, other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + e[:, None] * H + hh[None, :], mask=em[:, None] & hm[None, :], other=0.0)
                acc += wv.to(tl.float32) * xv[None, :]
            logit = tl.sum(acc, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            logit = tl.load(x_ptr + row * stride_x + e, mask=em, other=0.0).to(tl.float32)
        logit = tl.where(em, logit, float("-inf"))
        p = tl.exp(logit - tl.max(logit, axis=0))
        p = tl.where(em, p / tl.sum(p, axis=0), -1.0)
        j = tl.arange(0, KP)
        vals = tl.zeros((KP,), dtype=tl.float32)
        ids = tl.zeros((KP,), dtype=tl.int32)
        for r in tl.static_range(K):
            m = tl.max(p, axis=0)
            i = tl.min(tl.where(p == m, e, BE), axis=0)
            vals = tl.where(j == r, m, vals)
            ids = tl.where(j == r, i, ids)
            p = tl.where(e == i, -2.0, p)
        jm = j < K
        vals = tl.where(jm, vals, 0.0)
        tl.store(wout_ptr + row * K + j, vals / tl.sum(vals, axis=0), mask=jm)
        tl.store(iout_ptr + row * K + j, ids.to(tl.int64), mask=jm)

    @triton.jit
    def weighted_sum_kernel(y_ptr, w_ptr, c_ptr, out_ptr, S, N, H, HAS_COLS: tl.constexpr, BLOCK: tl.constexpr):
        """Program per BLOCK outputs: fp32 sum over the S splits and N experts, weight per expert."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, N):
            if HAS_COLS:
                wi = tl.load(w_ptr + tl.load(c_ptr + i)).to(tl.float32)
            else:
                wi = tl.load(w_ptr + i).to(tl.float32)
            part = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in range(0, S):
                part += tl.load(y_ptr + (s * N + i) * H + offs, mask=m, other=0.0).to(tl.float32)
            acc += part * wi
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, y_ptr, H, stride, eps, BLOCK: tl.constexpr):
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
    def rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, K_ptr, V_ptr, T, NH, MAX_LEN,
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

    @triton.jit
    def wait_slots_kernel(ids_ptr, row_ptr, flags_ptr, out_ptr, max_spins, K: tl.constexpr, KP: tl.constexpr):
        """One program: volatile loads of the K chosen entries of the row (the host's copies change
        them under the running kernel) until none is negative, the abort flag is set, or max_spins."""
        j = tl.arange(0, KP)
        jm = j < K
        e = tl.load(ids_ptr + j, mask=jm, other=0)
        b = tl.load(row_ptr + e, mask=jm, other=0, volatile=True)
        stop = tl.load(flags_ptr, volatile=True)
        spins = 0
        while (tl.min(tl.where(jm, b, 0), axis=0) < 0) & (stop == 0) & (spins < max_spins):
            b = tl.load(row_ptr + e, mask=jm, other=0, volatile=True)
            stop = tl.load(flags_ptr, volatile=True)
            spins += 1
        if tl.min(tl.where(jm, b, 0), axis=0) < 0:
            tl.store(flags_ptr + 1, 1)
        tl.store(out_ptr + j, tl.where(b < 0, 0, b), mask=jm)
