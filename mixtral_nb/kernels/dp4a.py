"""The one-token dp4a GEMV of 2/4-bit weights: integer dot products on 8-bit activations.

The activations are first cut into two int8 bytes per value (``quantize_x``: x ~ d * (256 h + l),
~15 bits kept), then each 32-bit word of codes is masked into 4-code bytes that one dp4a instruction
multiplies and adds (~1 instruction per weight instead of ~3 float ops in the word kernel). Tiles
take consecutive rows, or (2-bit weights whose scale meta goes by row) rows ``s_mod`` apart that
share their scale meta entries (``STRIDED``), gathered once per step for the tile. dp4a exists on
sm_61 and later, a T4 included; where inline PTX cannot run (the interpreter) it is spelled out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..quant import QSpec
from .capability import HAVE_TRITON, tl, triton
from .words import meta_args, words_per_split

QX_WORDS = 64  # words of x one quantize program handles

if HAVE_TRITON:
    from .words import grouped_pointers, load_even, load_words, scale_or_zero, single_meta


def whole_tiles(n: int, block_n: int, block_w: int, split: int, row_words: int) -> bool:
    """Whether every dp4a tile is whole: rows a multiple of ``block_n``, and the ``split`` K ranges
    whole blocks of ``block_w`` words that fill the row exactly. Then the kernel's loads need no
    masks (a masked load also costs a predicate and zeroing its registers, per load per step)."""
    return n % block_n == 0 and words_per_split(row_words, split, block_w) * split == row_words


def quantize_x(x: Tensor, vw: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Activations [T, K] as the dp4a kernel reads them: x ~ d * (256 h + l), h and l int8.

    Per row and word of ``vw`` weights (a 32-bit word of codes): ``h`` and ``l`` packed four to an
    int32, in the order the kernel's byte masks pick codes ([T, vw/4, K/vw]: int32 j of word w holds
    x[w*vw + b*vw/4 + j] in byte b); the step ``d`` (max |x| / 32512 over 32 values: the kernel
    multiplies its integer sums by it as they are) and the exact fp32 sum of the word's x values (for
    the zero points). 256 h + l is within max/32512 of each value.
    """
    rows, k = x.shape
    words = k // vw
    xh = torch.empty(rows, vw // 4, words, dtype=torch.int32, device=x.device)
    xl = torch.empty_like(xh)
    xd = torch.empty(rows, words, dtype=torch.float32, device=x.device)
    xsum = torch.empty_like(xd)
    quantize_x_kernel[(triton.cdiv(words, QX_WORDS), rows)](x, xh, xl, xd, xsum, words, x.stride(0), VW=vw, CW=QX_WORDS,
                                                       num_warps=4)
    return xh, xl, xd, xsum


def launch(xs: Tensor, ys: Tensor, t: dict[str, Tensor], spec: QSpec, p: dict[str, Any], group: tuple,
           block_n: int, block_w: int, num_warps: int, strided: bool, xq: tuple[Tensor, ...] | None,
           even: bool | None) -> None:
    """One ``gemv_dp4a_kernel`` launch for one row (``p``: the spec's ``plan``; ``group``: see
    ``dispatch._launch_gemv``); ``strided``: tiles of meta-sharing rows; ``xq``: the row already
    quantized (``shared_x``); ``even`` None: unmasked loads where every tile is whole."""
    slots, slot_bytes, mat_bytes, x_m, y_m, mps, m, y_s, split = group
    n = spec.out_features
    xh, xl, xd, xsum = xq if xq is not None else quantize_x(xs, 32 // p["pa"])
    args = (xh, xl, xd, xsum, ys, t[p["qa"]], *meta_args(t, spec), slots, slot_bytes, mat_bytes, 1 if x_m else 0, y_m,
            words_per_split(p["row_words_a"], split, block_w), y_s, n, p["row_words_a"], p["groups_per_row"],
            p["s_mod"], p["z_mod"], p["pa"], spec.group_size, spec.quant_scale, spec.quant_zero, p["s_mode"],
            p["z_mode"], mps, block_n, block_w, xs.is_cuda, strided)
    even = whole_tiles(n, block_n, block_w, split, p["row_words_a"]) if even is None else even
    gemv_dp4a_kernel[(triton.cdiv(n, block_n), m, split)](*args, even, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAVE_TRITON:

    @triton.jit
    def quantize_x_kernel(x_ptr, xh_ptr, xl_ptr, xd_ptr, xs_ptr, ROW_W, stride_x, VW: tl.constexpr, CW: tl.constexpr):
        """``quantize_x`` for words [program_id(0) * CW, + CW) of row program_id(1)."""
        J: tl.constexpr = VW // 4
        WB: tl.constexpr = 32 // VW  # words per step (32 values)
        row = tl.program_id(1)
        w = tl.program_id(0) * CW + tl.arange(0, CW)
        jj = tl.arange(0, J)
        bb = tl.arange(0, 4)
        k = w[:, None, None] * VW + bb[None, None, :] * J + jj[None, :, None]  # [CW, J, 4]
        mask = k < ROW_W * VW
        x = tl.load(x_ptr + row * stride_x + k, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
        amax = tl.max(tl.reshape(amax, [CW // WB, WB]), axis=1)
        amax = tl.reshape(tl.broadcast_to(amax[:, None], [CW // WB, WB]), [CW])
        d = tl.where(amax > 0, amax / 127.0, 1.0)
        v = x / d[:, None, None]
        h = tl.floor(v + 0.5)
        lo = tl.minimum(tl.maximum(tl.floor((v - h) * 256.0 + 0.5), -128.0), 127.0)
        sh = (bb * 8)[None, None, :]
        ph = tl.sum((h.to(tl.int32) & 0xFF) << sh, axis=2)  # disjoint bytes: the sum is an OR
        pl = tl.sum((lo.to(tl.int32) & 0xFF) << sh, axis=2)
        mw = w < ROW_W
        out = row * (J * ROW_W) + jj[None, :] * ROW_W + w[:, None]
        m2 = mw[:, None] & (jj[None, :] < J)
        tl.store(xh_ptr + out, ph, mask=m2)
        tl.store(xl_ptr + out, pl, mask=m2)
        tl.store(xd_ptr + row * ROW_W + w, d * (1.0 / 256.0), mask=mw)  # the step of 256 h + l
        tl.store(xs_ptr + row * ROW_W + w, tl.sum(tl.sum(x, axis=2), axis=1), mask=mw)

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        """``c`` + the dot product of the 4 unsigned bytes of ``a`` and the 4 signed bytes of ``b``:
        one instruction on sm_61+ (T4 included); spelled out where inline PTX cannot run (interpreter)."""
        if ASM:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            for i in tl.static_range(4):
                c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
            return c

    @triton.jit
    def _exact_float(v):
        """int32 ``v`` (|v| < 2^22) as float32, by adding it to the bits of 1.5 * 2^23 (no I2F unit)."""
        return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0

    @triton.jit
    def _next_words(w0, w_lo, w_hi, aw, BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
        """Word offsets of the block after the one at ``w0``, for loading it early. Past the end: the
        words that follow (masked off by the row end), or with EVEN (unmasked loads) the first block
        again, so that no load leaves the matrix."""
        nxt = w0 + BLOCK_W
        if EVEN:
            nxt = tl.where(nxt < w_hi, nxt, w_lo)
        return nxt + aw

    @triton.jit
    def gemv_dp4a_kernel(xh_ptr, xl_ptr, xd_ptr, xs_ptr, y_ptr, qa_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                   slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, WPS, Y_S, N, ROW_W, GPR, S_MOD, Z_MOD,
                   PA: tl.constexpr, G: tl.constexpr, SQ: tl.constexpr, ZQ: tl.constexpr, S_MODE: tl.constexpr,
                   Z_MODE: tl.constexpr, MPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                   ASM: tl.constexpr, STRIDED: tl.constexpr, EVEN: tl.constexpr = False):
        """One token, 2/4-bit words: y[n] = sum_w s_w * (dx_w * sum_i q_i (256 h_i + l_i) - z_w * sum_i x_i).

        The codes of a word are masked into bytes (``(word >> PA*j) & 0x0303..``) and multiplied with
        the matching activation bytes by dp4a: per 4 weights one shift/AND and two dp4a (high and
        low activation bytes), against ~3 float ops per weight in ``gemv_words_kernel``. X_M = 1: matrix m
        of a grouped launch has its own activation row m (else all share row 0). The next block's
        codes load while this block's are summed. STRIDED (scale meta by row, mode 1, zero meta mode
        0 or the same): a program's rows are S_MOD apart, so they share their scale meta entries,
        gathered once per step for the tile instead of once per row. EVEN: every tile is whole
        (rows, and words of every K split), so no load needs a mask.
        """
        VW: tl.constexpr = 32 // PA
        J: tl.constexpr = VW // 4
        WPG: tl.constexpr = G // VW
        MASK: tl.constexpr = ((1 << PA) - 1) * 0x01010101
        if MPS > 0:  # the weights at matrix m's slot; its activation row m when X_M is 1
            xh_ptr, y_ptr, qa_ptr, _, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = grouped_pointers(
                xh_ptr, y_ptr, qa_ptr, qa_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                slot_ptr, SLOT_BYTES, MAT_BYTES, X_M * (J * ROW_W), Y_M, MPS)
            xr = tl.program_id(1) * X_M
            xl_ptr += xr * (J * ROW_W)
            xd_ptr += xr * ROW_W
            xs_ptr += xr * ROW_W
        if STRIDED:
            mrow = tl.program_id(0) % S_MOD
            rows = ((tl.program_id(0) // S_MOD) * BLOCK_N + tl.arange(0, BLOCK_N)) * S_MOD + mrow
        else:
            mrow = 0
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        aw = tl.arange(0, BLOCK_W)
        qa_w = qa_ptr.to(tl.pointer_type(tl.int32))
        ms0, mz0 = single_meta(sms_ptr, smz_ptr, SQ, S_MODE)
        zms0, zmz0 = single_meta(zms_ptr, zmz_ptr, ZQ, Z_MODE)
        acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        w_lo = tl.program_id(2) * WPS
        w_hi = tl.minimum(w_lo + WPS, ROW_W)
        y_ptr += tl.program_id(2) * Y_S
        a, _ = load_words(qa_w, qa_w, rows, w_lo + aw, N, ROW_W, ROW_W, 0, EVEN)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            offs_w = w0 + aw
            mw = offs_w < w_hi
            cur = a
            a, _ = load_words(qa_w, qa_w, rows, _next_words(w0, w_lo, w_hi, aw, BLOCK_W, EVEN), N, ROW_W, ROW_W, 0,
                               EVEN)
            ih = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
            il = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
            for j in tl.static_range(J):
                c = (cur >> (PA * j)) & MASK
                xh = load_even(xh_ptr + j * ROW_W + offs_w, mw, 0, EVEN)
                xl = load_even(xl_ptr + j * ROW_W + offs_w, mw, 0, EVEN)
                ih = _dp4a(c, tl.broadcast_to(xh[None, :], [BLOCK_N, BLOCK_W]), ih, ASM)
                il = _dp4a(c, tl.broadcast_to(xl[None, :], [BLOCK_N, BLOCK_W]), il, ASM)
            xd = load_even(xd_ptr + offs_w, mw, 0.0, EVEN)
            xs = load_even(xs_ptr + offs_w, mw, 0.0, EVEN)
            d = _exact_float(ih * 256 + il) * xd[None, :]
            kg = offs_w // WPG
            s = scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE, mrow,
                               STRIDED, EVEN)
            z = scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE, mrow,
                               STRIDED, EVEN)
            acc += s * (d - z * xs[None, :])
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)
