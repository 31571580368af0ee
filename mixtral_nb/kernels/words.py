"""The fp32 word kernel, the element-wise (generic) GEMV and the dequantize kernel, with the Triton
helpers every quantized kernel shares (meta lookups, grouped-launch pointers, code extraction).

- ``gemv_words_kernel``: axis-1 groups made of whole 32-bit words (2/3/4-bit): ``sum_w s_w * (sum_i q_i x_i
  - z_w * sum_i x_i)`` in fp32, per weight one AND/OR, one add and one multiply-add; T = 1..4 rows.
- ``gemv_axis0_kernel``: hqq 0.1.1's axis-0 groups (the article's files) of 2/4-bit words: a program takes up to
  16 of the G rows that share each column's scale and zero, so s_k x_k is formed once per column and each
  weight costs what it costs in the word kernel.
- ``gemv_generic_kernel``: any axis and group size, a tile dequantized element by element, then a dot.
- ``dequant_kernel``: the weight written out in fp16/fp32, for prefill's dequantize + cuBLAS.

Codes become floats with an exponent trick (OR an exponent onto the masked bits, subtract the power
of two): full-rate integer and float ops instead of the quarter-rate int-to-float unit. No tensor
cores, bf16 or sm80-only instructions: everything builds for a T4 (sm_75).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..quant import QSpec
from .capability import HAVE_TRITON, tl, triton

DEQ_BLOCK = (16, 128)  # dequantize kernel tile (rows, columns)


def words_per_split(row_words: int, split: int, block_w: int) -> int:
    """Words of a row that each of ``split`` K splits owns: whole blocks of ``block_w``, so only the
    last split may come up short (its blocks past the row's end are masked off)."""
    return -(-row_words // (split * block_w)) * block_w


def meta_args(t: dict[str, Tensor], spec: QSpec) -> tuple[Tensor, ...]:
    """Scale and zero tensors in kernel-argument order (plain fp16 vectors stand in for the meta)."""
    s = (t["scale_q"], t["scale_ms"], t["scale_mz"]) if spec.quant_scale else (t["scale"],) * 3
    z = (t["zero_q"], t["zero_ms"], t["zero_mz"]) if spec.quant_zero else (t["zero"],) * 3
    return s + z


def launch_words(xs: Tensor, ys: Tensor, tt: int, t: dict[str, Tensor], spec: QSpec, p: dict[str, Any],
                 group: tuple, block_n: int, block_k: int, num_warps: int, tiles: int) -> None:
    """One ``gemv_words_kernel`` launch for ``tt`` <= 4 rows (``p``: the spec's ``plan``; ``group``: see
    ``dispatch._launch_gemv``); ``tiles`` row tiles per program, capped so R * T <= 4."""
    slots, slot_bytes, mat_bytes, x_m, y_m, mps, m, y_s, split = group
    n = spec.out_features
    r_tiles = min(tiles, 4 // tt)  # R * T <= 4 accumulators
    bw = max(1, block_k * p["pa"] // 32)
    wps = words_per_split(p["row_words_a"], split, bw)
    args = (xs, ys, t[p["qa"]], t[p["qb"]], *meta_args(t, spec), slots, slot_bytes, mat_bytes, x_m, y_m, wps, y_s, n,
            p["row_words_a"], p["row_words_b"], p["groups_per_row"], p["s_mod"], p["z_mod"], xs.stride(0),
            ys.stride(-2), tt, r_tiles, p["pa"], p["pb"], spec.group_size, spec.quant_scale, spec.quant_zero,
            p["s_mode"], p["z_mode"], mps, block_n, bw)
    gemv_words_kernel[(triton.cdiv(n, block_n * r_tiles), m, split)](*args, num_warps=num_warps)


def _elementwise_args(xs: Tensor, ys: Tensor, tt: int, t: dict[str, Tensor], spec: QSpec, p: dict[str, Any],
                      group: tuple) -> tuple:
    """The run-time arguments the element-wise and axis-0 kernels share, in their order (up to ``G``)."""
    slots, slot_bytes, mat_bytes, x_m, y_m, _, _, _, _ = group
    return (xs, ys, t[p["qa"]], t[p["qb"]], *meta_args(t, spec), slots, slot_bytes, mat_bytes, x_m, y_m,
            spec.out_features, spec.in_features, p["ms"], p["mz"], xs.stride(0), ys.stride(-2), tt, p["pa"],
            p["pb"], spec.group_size)


def launch_generic(xs: Tensor, ys: Tensor, tt: int, t: dict[str, Tensor], spec: QSpec, p: dict[str, Any],
                   group: tuple, block_n: int, block_k: int, num_warps: int) -> None:
    """One ``gemv_generic_kernel`` launch for ``tt`` <= 4 rows (any axis and group size; no K split)."""
    mps, m = group[5], group[6]
    args = (*_elementwise_args(xs, ys, tt, t, spec, p, group), spec.axis, spec.quant_scale, spec.quant_zero, mps,
            block_n, block_k)
    gemv_generic_kernel[(triton.cdiv(spec.out_features, block_n), m)](*args, num_warps=num_warps)


def launch_axis0(xs: Tensor, ys: Tensor, tt: int, t: dict[str, Tensor], spec: QSpec, p: dict[str, Any],
                 group: tuple, block_w: int, num_warps: int) -> None:
    """One ``gemv_axis0_kernel`` launch for ``tt`` <= 4 rows: N / ROWS programs of ROWS rows each, K in
    steps of ``block_w`` words."""
    mps, m = group[5], group[6]
    args = (*_elementwise_args(xs, ys, tt, t, spec, p, group), spec.quant_scale, spec.quant_zero, mps,
            p["axis0_rows"], block_w, p["axis0_s_mode"], p["axis0_z_mode"])
    gemv_axis0_kernel[(spec.out_features // p["axis0_rows"], m)](*args, num_warps=num_warps)


def dequantize_fused(t: dict[str, Tensor], spec: QSpec, p: dict[str, Any], dtype: torch.dtype = torch.float16,
                     out: Tensor | None = None) -> Tensor:
    """The weight [N, K] in ``dtype`` (or into contiguous ``out``), dequantized by ``dequant_kernel``."""
    n, k = spec.out_features, spec.in_features
    w = torch.empty(n, k, dtype=dtype, device=t[p["qa"]].device) if out is None else out
    bn, bk = DEQ_BLOCK
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    args = (w, t[p["qa"]], t[p["qb"]], *meta_args(t, spec), n, k, p["ms"], p["mz"], p["pa"], p["pb"],
            spec.group_size, spec.axis, spec.quant_scale, spec.quant_zero, bn, bk)
    dequant_kernel[grid](*args, num_warps=4)
    return w


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAVE_TRITON:

    @triton.jit
    def _to_f32(code):
        """Small non-negative int32 codes -> float32 without the slow int-to-float unit."""
        return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _meta_dequant(v, ms_ptr, mz_ptr, mi, mask):
        """8-bit codes ``v`` (as float32) -> values, with the fp16 meta scale/zero at entries ``mi``."""
        mz = tl.load(mz_ptr + mi, mask=mask, other=0.0).to(tl.float32)
        ms = tl.load(ms_ptr + mi, mask=mask, other=0.0).to(tl.float32)
        return (v - mz) * ms

    @triton.jit
    def _group_meta(ptr, ms_ptr, mz_ptr, c, mask, M_META, QUANT: tl.constexpr):
        """Step sizes or zero points of groups ``c``: 8-bit codes with fp16 meta, or plain fp16."""
        if QUANT:
            v = tl.load(ptr + c, mask=mask, other=0).to(tl.float32)
            return _meta_dequant(v, ms_ptr, mz_ptr, c % M_META, mask)
        else:
            return tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _shift(ptr, nbytes):
        """``ptr`` moved by ``nbytes`` bytes (int64), keeping its element type."""
        return (ptr.to(tl.pointer_type(tl.uint8)) + nbytes).to(ptr.dtype)

    @triton.jit
    def _slot_offset(slot_ptr, SLOT_BYTES, MAT_BYTES, MPS: tl.constexpr):
        """Bytes from slot 0's matrix to matrix ``program_id(1)`` of a grouped launch."""
        m = tl.program_id(1)
        return tl.load(slot_ptr + m // MPS).to(tl.int64) * SLOT_BYTES + (m % MPS).to(tl.int64) * MAT_BYTES

    @triton.jit
    def grouped_pointers(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                          slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, MPS: tl.constexpr):
        """The pointers of matrix ``program_id(1)`` of a grouped launch (see ``qgemv_grouped``): the
        weight tensors moved from slot 0 to its slot (and to w3 for odd m when MPS is 2), x and y to its row."""
        m = tl.program_id(1)
        off = _slot_offset(slot_ptr, SLOT_BYTES, MAT_BYTES, MPS)
        return (x_ptr + m * X_M, y_ptr + m * Y_M, _shift(qa_ptr, off), _shift(qb_ptr, off), _shift(s_ptr, off),
                _shift(sms_ptr, off), _shift(smz_ptr, off), _shift(z_ptr, off), _shift(zms_ptr, off),
                _shift(zmz_ptr, off))

    @triton.jit
    def _small_int(bits, SHIFT: tl.constexpr):
        """``(bits >> SHIFT)`` as float32, for ``bits`` holding only bits SHIFT .. SHIFT+3 (< 2^23).

        Gives the value the exponent 150 - SHIFT, so the mantissa's bits already read as the code:
        float(2^(23-SHIFT) + code) - 2^(23-SHIFT), one OR and one add instead of shift + convert.
        """
        return (bits | ((150 - SHIFT) << 23)).to(tl.float32, bitcast=True) - (1 << (23 - SHIFT))

    @triton.jit
    def load_even(ptr, mask, other, EVEN: tl.constexpr):
        """``tl.load``, unmasked when EVEN (the launcher checked that every address is in range): a
        masked load also costs a predicate and zeroing its registers, per load per step."""
        if EVEN:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=mask, other=other)

    @triton.jit
    def _sz_load(ptr, ms_ptr, mz_ptr, rows, kg, mw, N, MOD, GPR, MROW, QUANT: tl.constexpr, MODE: tl.constexpr,
                 SHARED: tl.constexpr, EVEN: tl.constexpr = False):
        """The raw loads behind ``scale_or_zero`` (8-bit codes or fp16 values, and the gathered meta
        entries), unconverted, so a loop can issue them a step before they are used. SHARED (mode 1):
        every row of the tile has ``row % MOD == MROW``, so one row of meta entries serves them all."""
        c = rows[:, None] * GPR + kg[None, :]
        mask = (rows[:, None] < N) & mw[None, :]
        if QUANT:
            raw = load_even(ptr + c, mask, 0, EVEN)
            if MODE == 0:
                return raw, raw, raw
            else:
                if SHARED:
                    mi = MROW * GPR + kg[None, :]
                    mmask = mw[None, :]
                elif MODE == 1:
                    mi = (rows % MOD)[:, None] * GPR + kg[None, :]
                    mmask = mask
                else:
                    mi = c % MOD
                    mmask = mask
                mz = load_even(mz_ptr + mi, mmask, 0.0, EVEN)
                return raw, load_even(ms_ptr + mi, mmask, 0.0, EVEN), mz
        else:
            raw = tl.load(ptr + c, mask=mask, other=0.0)
            return raw, raw, raw

    @triton.jit
    def _sz_value(raw, ms, mz, ms0, mz0, QUANT: tl.constexpr, MODE: tl.constexpr):
        """Step sizes or zero points from ``_sz_load``'s values: (code - meta zero) * meta step, or fp16 as is."""
        if QUANT:
            v = _small_int(raw.to(tl.int32), 0)
            if MODE == 0:  # one fma: ms0 * mz0 is computed once, outside the loop
                return v * ms0 - ms0 * mz0
            else:
                return (v - mz.to(tl.float32)) * ms.to(tl.float32)
        else:
            return raw.to(tl.float32)

    @triton.jit
    def scale_or_zero(ptr, ms_ptr, mz_ptr, rows, kg, mw, N, MOD, GPR, ms0, mz0,
                       QUANT: tl.constexpr, MODE: tl.constexpr, MROW=0, SHARED: tl.constexpr = False,
                       EVEN: tl.constexpr = False):
        """Step sizes or zero points of the groups of words ``kg`` of ``rows`` (see ``dispatch.plan``'s meta modes;
        MROW, SHARED, EVEN: see ``_sz_load`` and ``load_even``)."""
        raw, ms, mz = _sz_load(ptr, ms_ptr, mz_ptr, rows, kg, mw, N, MOD, GPR, MROW, QUANT, MODE, SHARED, EVEN)
        return _sz_value(raw, ms, mz, ms0, mz0, QUANT, MODE)

    @triton.jit
    def single_meta(ms_ptr, mz_ptr, QUANT: tl.constexpr, MODE: tl.constexpr):
        """The one (step, zero) meta pair of a weight whose scales or zeros share it (mode 0), else zeros."""
        ms = 0.0
        mz = 0.0
        if QUANT:
            if MODE == 0:
                ms = tl.load(ms_ptr).to(tl.float32)
                mz = tl.load(mz_ptr).to(tl.float32)
        return ms, mz

    @triton.jit
    def _pick(v0, v1, v2, v3, IDX: tl.constexpr):
        """``(v0, v1, v2, v3)[IDX]`` for a compile-time IDX (Triton has no lists of tensors)."""
        if IDX == 0:
            return v0
        elif IDX == 1:
            return v1
        elif IDX == 2:
            return v2
        else:
            return v3

    @triton.jit
    def load_words(qa_w, qb_w, rows, offs_w, N, ROW_WA, ROW_WB, PB: tl.constexpr,
                    EVEN: tl.constexpr = False):
        """Raw words of a [BLOCK_N, BLOCK_W] tile: plane A, and plane B shifted to the same weights
        (3-bit only; 0 otherwise). Words past the row's end read as 0 (EVEN: see ``load_even``)."""
        w2 = offs_w[None, :]
        mask = (rows[:, None] < N) & (w2 < ROW_WA)
        a = load_even(qa_w + rows[:, None] * ROW_WA + w2, mask, 0, EVEN)
        if PB > 0:  # 3-bit: plane B holds bit 2 of every code, 32 per word = two words of plane A
            b = tl.load(qb_w + rows[:, None] * ROW_WB + w2 // 2, mask=mask, other=0)
            b = b >> ((w2 % 2) * 16)
        else:
            b = 0
        return a, b

    @triton.jit
    def _halves(a):
        """The two 16-bit halves of each word under the float exponent of 2^23 (see ``_code``)."""
        return (a & 0xFFFF) | 0x4B000000, ((a >> 16) & 0xFFFF) | 0x4B000000

    @triton.jit
    def _code(lo, hi, b, IW: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr):
        """Weight IW of each word as float32 ``code * 2^sh`` (the caller scales x by 2^-sh).

        ``lo``/``hi`` are 16 code bits under the exponent of 2^23: keeping the exponent and one
        code's bits (a single AND) gives the float 2^23 + code * 2^sh, exact, with no shift and no
        int-to-float conversion; subtracting 2^23 leaves code * 2^sh.
        """
        HALF: tl.constexpr = 16 // PA
        sh = PA * (IW % HALF)
        keep = 0x7F800000 | (((1 << PA) - 1) << sh)
        if IW < HALF:
            bits = lo & keep
        else:
            bits = hi & keep
        if PB > 0:  # move bit IW of b to just above the low bits
            up = sh + PA - IW
            if up >= 0:
                bits = bits | ((b << up) & (1 << (sh + PA)))
            else:
                bits = bits | ((b >> (0 - up)) & (1 << (sh + PA)))
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def gemv_words_kernel(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                    slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, WPS, Y_S, N, ROW_WA, ROW_WB, GPR, S_MOD, Z_MOD,
                    stride_x, stride_y,
                    T: tl.constexpr, R: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr,
                    SQ: tl.constexpr, ZQ: tl.constexpr, S_MODE: tl.constexpr, Z_MODE: tl.constexpr,
                    MPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        """Axis-1 groups of whole 32-bit words: y[t, n] = sum_w s_w * (sum_i q_i x_ti - z_w * sum_i x_ti).

        A program owns R tiles of [BLOCK_N rows, BLOCK_W words of plane A] (R * T <= 4); word w of
        a row holds its VW weights (k = w*VW + i), and its group's step/zero is gathered per word.
        Per weight the work is one AND/OR, one add and one multiply-add; each x value is loaded and
        converted once for the R tiles (Triton gives every thread one row of a tile, so without the
        R tiles each weight would cost an x load too). Accumulator j serves x row j // R, tile j % R.
        MPS > 0: grouped launch (``qgemv_grouped``), program_id(1) picks the matrix.
        """
        if MPS > 0:
            x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = grouped_pointers(
                x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, MPS)
        VW: tl.constexpr = 32 // PA  # weights per word of plane A
        WPG: tl.constexpr = G // VW  # words per group
        J: tl.constexpr = T * R
        pid = tl.program_id(0)
        rows0 = pid * (BLOCK_N * R) + tl.arange(0, BLOCK_N)
        rows1 = rows0 + BLOCK_N
        rows2 = rows0 + 2 * BLOCK_N
        rows3 = rows0 + 3 * BLOCK_N
        qa_w = qa_ptr.to(tl.pointer_type(tl.int32))
        qb_w = qb_ptr.to(tl.pointer_type(tl.int32))
        ms0, mz0 = single_meta(sms_ptr, smz_ptr, SQ, S_MODE)
        zms0, zmz0 = single_meta(zms_ptr, zmz_ptr, ZQ, Z_MODE)
        acc0 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        # codes are loaded one block ahead, so their latency overlaps the previous block's math
        # split-K: program_id(2) owns words [w_lo, w_hi) of every row and writes its own partial sums
        w_lo = tl.program_id(2) * WPS
        w_hi = tl.minimum(w_lo + WPS, ROW_WA)
        y_ptr += tl.program_id(2) * Y_S
        offs_w = w_lo + tl.arange(0, BLOCK_W)
        a0, b0 = load_words(qa_w, qb_w, rows0, offs_w, N, ROW_WA, ROW_WB, PB)
        if R > 1:
            a1, b1 = load_words(qa_w, qb_w, rows1, offs_w, N, ROW_WA, ROW_WB, PB)
        if R > 2:
            a2, b2 = load_words(qa_w, qb_w, rows2, offs_w, N, ROW_WA, ROW_WB, PB)
            a3, b3 = load_words(qa_w, qb_w, rows3, offs_w, N, ROW_WA, ROW_WB, PB)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mw = offs_w < w_hi
            next_w = offs_w + BLOCK_W
            lo0, hi0 = _halves(a0)
            c0 = b0
            a0, b0 = load_words(qa_w, qb_w, rows0, next_w, N, ROW_WA, ROW_WB, PB)
            lo1, hi1, c1 = lo0, hi0, c0
            lo2, hi2, c2 = lo0, hi0, c0
            lo3, hi3, c3 = lo0, hi0, c0
            if R > 1:
                lo1, hi1 = _halves(a1)
                c1 = b1
                a1, b1 = load_words(qa_w, qb_w, rows1, next_w, N, ROW_WA, ROW_WB, PB)
            if R > 2:
                lo2, hi2 = _halves(a2)
                c2 = b2
                a2, b2 = load_words(qa_w, qb_w, rows2, next_w, N, ROW_WA, ROW_WB, PB)
                lo3, hi3 = _halves(a3)
                c3 = b3
                a3, b3 = load_words(qa_w, qb_w, rows3, next_w, N, ROW_WA, ROW_WB, PB)
            d0 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
            d1 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
            d2 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
            d3 = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
            xs0 = tl.zeros([BLOCK_W], dtype=tl.float32)
            xs1 = tl.zeros([BLOCK_W], dtype=tl.float32)
            xs2 = tl.zeros([BLOCK_W], dtype=tl.float32)
            xs3 = tl.zeros([BLOCK_W], dtype=tl.float32)
            for i in tl.static_range(VW):
                q0 = _code(lo0, hi0, c0, i, PA, PB)
                q1, q2, q3 = q0, q0, q0
                if R > 1:
                    q1 = _code(lo1, hi1, c1, i, PA, PB)
                if R > 2:
                    q2 = _code(lo2, hi2, c2, i, PA, PB)
                    q3 = _code(lo3, hi3, c3, i, PA, PB)
                xp = x_ptr + offs_w * VW + i
                unscale = 1.0 / (1 << (PA * (i % (16 // PA))))  # undoes _code's 2^sh (exact)
                x0 = tl.load(xp, mask=mw, other=0.0).to(tl.float32)
                xs0 += x0
                x0 = x0 * unscale
                x1, x2, x3 = x0, x0, x0
                if T > 1:
                    x1 = tl.load(xp + stride_x, mask=mw, other=0.0).to(tl.float32)
                    xs1 += x1
                    x1 = x1 * unscale
                if T > 2:
                    x2 = tl.load(xp + 2 * stride_x, mask=mw, other=0.0).to(tl.float32)
                    xs2 += x2
                    x2 = x2 * unscale
                if T > 3:
                    x3 = tl.load(xp + 3 * stride_x, mask=mw, other=0.0).to(tl.float32)
                    xs3 += x3
                    x3 = x3 * unscale
                d0 += q0 * x0[None, :]
                if J > 1:
                    d1 += _pick(q0, q1, q2, q3, 1 % R) * _pick(x0, x1, x2, x3, 1 // R)[None, :]
                if J > 2:
                    d2 += _pick(q0, q1, q2, q3, 2 % R) * _pick(x0, x1, x2, x3, 2 // R)[None, :]
                if J > 3:
                    d3 += _pick(q0, q1, q2, q3, 3 % R) * _pick(x0, x1, x2, x3, 3 // R)[None, :]
            kg = offs_w // WPG
            s0 = scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows0, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
            z0 = scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows0, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
            s1, s2, s3, z1, z2, z3 = s0, s0, s0, z0, z0, z0
            if R > 1:
                s1 = scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows1, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
                z1 = scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows1, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
            if R > 2:
                s2 = scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows2, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
                z2 = scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows2, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
                s3 = scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows3, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
                z3 = scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows3, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
            acc0 += s0 * (d0 - z0 * xs0[None, :])
            if J > 1:
                acc1 += _pick(s0, s1, s2, s3, 1 % R) * (
                    d1 - _pick(z0, z1, z2, z3, 1 % R) * _pick(xs0, xs1, xs2, xs3, 1 // R)[None, :])
            if J > 2:
                acc2 += _pick(s0, s1, s2, s3, 2 % R) * (
                    d2 - _pick(z0, z1, z2, z3, 2 % R) * _pick(xs0, xs1, xs2, xs3, 2 // R)[None, :])
            if J > 3:
                acc3 += _pick(s0, s1, s2, s3, 3 % R) * (
                    d3 - _pick(z0, z1, z2, z3, 3 % R) * _pick(xs0, xs1, xs2, xs3, 3 // R)[None, :])
        out_ty = y_ptr.dtype.element_ty
        rows = _pick(rows0, rows1, rows2, rows3, 0)
        tl.store(y_ptr + rows, tl.sum(acc0, axis=1).to(out_ty), mask=rows < N)
        if J > 1:
            rows = _pick(rows0, rows1, rows2, rows3, 1 % R)
            tl.store(y_ptr + (1 // R) * stride_y + rows, tl.sum(acc1, axis=1).to(out_ty), mask=rows < N)
        if J > 2:
            rows = _pick(rows0, rows1, rows2, rows3, 2 % R)
            tl.store(y_ptr + (2 // R) * stride_y + rows, tl.sum(acc2, axis=1).to(out_ty), mask=rows < N)
        if J > 3:
            rows = _pick(rows0, rows1, rows2, rows3, 3 % R)
            tl.store(y_ptr + (3 // R) * stride_y + rows, tl.sum(acc3, axis=1).to(out_ty), mask=rows < N)

    @triton.jit
    def _codes(qa_ptr, qb_ptr, n2, k2, mask, K, PA: tl.constexpr, PB: tl.constexpr):
        """Codes W[n2, k2] (int32) from their bit planes, each element reading its own byte."""
        VA: tl.constexpr = 8 // PA
        a = tl.load(qa_ptr + n2 * (K // VA) + k2 // VA, mask=mask, other=0).to(tl.int32)
        code = (a >> (PA * (k2 % VA))) & ((1 << PA) - 1)
        if PB > 0:
            VB: tl.constexpr = 8 // PB
            b = tl.load(qb_ptr + n2 * (K // VB) + k2 // VB, mask=mask, other=0).to(tl.int32)
            code = code | (((b >> (PB * (k2 % VB))) & ((1 << PB) - 1)) << PA)
        return code

    @triton.jit
    def _zero_rows(B: tl.constexpr):
        """Four fp32 accumulators of B outputs (one per row of x; rows past T stay unused)."""
        z = tl.zeros([B], dtype=tl.float32)
        return z, z, z, z

    @triton.jit
    def _dot_rows(w, x_ptr, offs_k, mk, stride_x, acc0, acc1, acc2, acc3, T: tl.constexpr):
        """``acc_t += w @ x_t`` over one K step, for each of x's T <= 4 rows."""
        x0 = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
        acc0 += tl.sum(w * x0[None, :], axis=1)
        if T > 1:
            x1 = tl.load(x_ptr + stride_x + offs_k, mask=mk, other=0.0).to(tl.float32)
            acc1 += tl.sum(w * x1[None, :], axis=1)
        if T > 2:
            x2 = tl.load(x_ptr + 2 * stride_x + offs_k, mask=mk, other=0.0).to(tl.float32)
            acc2 += tl.sum(w * x2[None, :], axis=1)
        if T > 3:
            x3 = tl.load(x_ptr + 3 * stride_x + offs_k, mask=mk, other=0.0).to(tl.float32)
            acc3 += tl.sum(w * x3[None, :], axis=1)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _store_rows(out, mask, stride_y, acc0, acc1, acc2, acc3, T: tl.constexpr):
        """Each of the T rows' results at ``out`` (+ t * stride_y), in the output's dtype."""
        out_ty = out.dtype.element_ty
        tl.store(out, acc0.to(out_ty), mask=mask)
        if T > 1:
            tl.store(out + stride_y, acc1.to(out_ty), mask=mask)
        if T > 2:
            tl.store(out + 2 * stride_y, acc2.to(out_ty), mask=mask)
        if T > 3:
            tl.store(out + 3 * stride_y, acc3.to(out_ty), mask=mask)

    @triton.jit
    def _dequant_tile(qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, n2, k2, mask, N, K, MS, MZ,
                      PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr,
                      SQ: tl.constexpr, ZQ: tl.constexpr):
        """Weights W[n2, k2] in float32, each element indexing its own byte, scale and zero."""
        code = _codes(qa_ptr, qb_ptr, n2, k2, mask, K, PA, PB)
        if AXIS == 1:
            c = n2 * (K // G) + k2 // G
        else:
            c = (n2 % (N // G)) * K + k2
        s = _group_meta(s_ptr, sms_ptr, smz_ptr, c, mask, MS, SQ)
        z = _group_meta(z_ptr, zms_ptr, zmz_ptr, c, mask, MZ, ZQ)
        return (_to_f32(code) - z) * s

    @triton.jit
    def gemv_generic_kernel(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                      slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, N, K, MS, MZ, stride_x, stride_y,
                      T: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr,
                      SQ: tl.constexpr, ZQ: tl.constexpr, MPS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """Any axis and group size: dequantize a [BLOCK_N, BLOCK_K] tile element-wise, then dot."""
        if MPS > 0:
            x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = grouped_pointers(
                x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, MPS)
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n2 = offs_n[:, None]
        acc0, acc1, acc2, acc3 = _zero_rows(BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k2 = offs_k[None, :]
            mk = offs_k < K
            w = _dequant_tile(qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, n2, k2,
                              (n2 < N) & (k2 < K), N, K, MS, MZ, PA, PB, G, AXIS, SQ, ZQ)
            acc0, acc1, acc2, acc3 = _dot_rows(w, x_ptr, offs_k, mk, stride_x, acc0, acc1, acc2, acc3, T)
        _store_rows(y_ptr + offs_n, offs_n < N, stride_y, acc0, acc1, acc2, acc3, T)

    @triton.jit
    def _axis0_meta(ptr, ms_ptr, mz_ptr, c, m0, i, M, mask, ms0, mz0, QUANT: tl.constexpr, MODE: tl.constexpr):
        """Step sizes or zero points of axis-0 groups ``c`` (+ i): 8-bit codes with fp16 meta, or plain fp16.

        The meta entry of group c is c mod M; ``m0`` is (c - i) mod M, so no division per column. MODE 0:
        one meta entry (``ms0``, ``mz0``); 1: M >= i + 1, the entry wraps at most once; 2: a division.
        """
        if QUANT:
            v = _to_f32(tl.load(ptr + c, mask=mask, other=0).to(tl.int32))
            if MODE == 0:
                out = v * ms0 - ms0 * mz0
            else:
                mi = m0 + i
                if MODE == 1:
                    mi = tl.where(mi >= M, mi - M, mi)
                else:
                    mi = mi % M
                out = _meta_dequant(v, ms_ptr, mz_ptr, mi, mask)
        else:
            out = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
        return out

    @triton.jit
    def gemv_axis0_kernel(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                          slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, N, K, MS, MZ, stride_x, stride_y,
                          T: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr,
                          SQ: tl.constexpr, ZQ: tl.constexpr, MPS: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_W: tl.constexpr, S_MODE: tl.constexpr, Z_MODE: tl.constexpr):
        """Axis-0 groups of 2/4-bit words: group ``r * K + k`` is column k of rows r, r + N/G, ..., r + (G-1) N/G.

        A program takes ROWS of those G rows (all of them when G <= 16; attention's G = 64 in 4 programs,
        so its small matrices still fill a GPU). Their column k shares one step s_k and zero z_k, so
        y[n] = sum_k q[n, k] (s_k x_k) - sum_k s_k z_k x_k: s_k x_k and the second sum are computed once
        per column for all ROWS rows, and each weight costs what it costs in ``gemv_words_kernel`` (one
        AND, one add, one multiply-add), its codes read as whole 32-bit words along K, as stored.
        The meta entries (the 8-bit codes' own step and zero) of column k are entry (r K + k) mod MS (MZ):
        found once per word and stepped, with no division per column (S_MODE, Z_MODE: see ``_axis0_meta``).
        """
        if MPS > 0:
            x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = grouped_pointers(
                x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, MPS)
        VW: tl.constexpr = 32 // PA  # weights per word
        HALF: tl.constexpr = 16 // PA
        row_w = K // VW
        pid = tl.program_id(0)
        r = pid // (G // ROWS)  # the base row; this program takes rows j*ROWS .. j*ROWS + ROWS-1 of its G
        j = pid % (G // ROWS)
        rows = r + (N // G) * (j * ROWS + tl.arange(0, ROWS))
        qa_w = qa_ptr.to(tl.pointer_type(tl.int32))
        base = r * K  # group index of column 0 (< N K / G: int32)
        ms0, mz0 = single_meta(sms_ptr, smz_ptr, SQ, S_MODE)
        zms0, zmz0 = single_meta(zms_ptr, zmz_ptr, ZQ, Z_MODE)
        aw = tl.arange(0, BLOCK_W)
        acc0 = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        acc1, acc2, acc3 = acc0, acc0, acc0
        b0 = tl.zeros([BLOCK_W], dtype=tl.float32)  # sum_k s_k z_k x_tk, per word lane
        b1, b2, b3 = b0, b0, b0
        a, _ = load_words(qa_w, qa_w, rows, aw, N, row_w, row_w, 0)
        for w0 in range(0, row_w, BLOCK_W):  # the next block's words load while this block's are summed
            offs_w = w0 + aw
            mw = offs_w < row_w
            lo, hi = _halves(a)
            a, _ = load_words(qa_w, qa_w, rows, offs_w + BLOCK_W, N, row_w, row_w, 0)
            k0 = offs_w * VW
            c0 = base + k0
            sm0 = c0
            zm0 = c0
            if S_MODE > 0:
                sm0 = c0 % MS
            if Z_MODE > 0:
                zm0 = c0 % MZ
            for h in tl.static_range(2):  # the word's low 16 bits, then its high 16 bits
                half = lo
                if h == 1:
                    half = hi
                # a loop, not unrolled: unrolled, the kernel had 2.3x the code and took 3x as long to build, which
                # Triton does at its first use (the rehearsal's first reply: 17.8 s unrolled, 1.8 s looped)
                for ii in tl.range(0, HALF, loop_unroll_factor=1):
                    i = h * HALF + ii
                    k = k0 + i
                    s = _axis0_meta(s_ptr, sms_ptr, smz_ptr, c0 + i, sm0, i, MS, mw, ms0, mz0, SQ, S_MODE)
                    z = _axis0_meta(z_ptr, zms_ptr, zmz_ptr, c0 + i, zm0, i, MZ, mw, zms0, zmz0, ZQ, Z_MODE)
                    sh = PA * ii
                    # the code's bits under the exponent of 2^23: code * 2^sh + 2^23, exact (see _code)
                    q = (half & (0x7F800000 | (((1 << PA) - 1) << sh))).to(tl.float32, bitcast=True) - 8388608.0
                    unscale = ((127 - sh) << 23).to(tl.float32, bitcast=True)  # 2^-sh, undoing the code's 2^sh
                    sx = s * tl.load(x_ptr + k, mask=mw, other=0.0).to(tl.float32)  # masked columns: s = 0
                    b0 += sx * z
                    acc0 += q * (sx * unscale)[None, :]
                    if T > 1:
                        sx = s * tl.load(x_ptr + stride_x + k, mask=mw, other=0.0).to(tl.float32)
                        b1 += sx * z
                        acc1 += q * (sx * unscale)[None, :]
                    if T > 2:
                        sx = s * tl.load(x_ptr + 2 * stride_x + k, mask=mw, other=0.0).to(tl.float32)
                        b2 += sx * z
                        acc2 += q * (sx * unscale)[None, :]
                    if T > 3:
                        sx = s * tl.load(x_ptr + 3 * stride_x + k, mask=mw, other=0.0).to(tl.float32)
                        b3 += sx * z
                        acc3 += q * (sx * unscale)[None, :]
        _store_rows(y_ptr + rows, rows < N, stride_y, tl.sum(acc0, axis=1) - tl.sum(b0, axis=0),
                    tl.sum(acc1, axis=1) - tl.sum(b1, axis=0), tl.sum(acc2, axis=1) - tl.sum(b2, axis=0),
                    tl.sum(acc3, axis=1) - tl.sum(b3, axis=0), T)

    @triton.jit
    def dequant_kernel(w_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, N, K, MS, MZ,
                 PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr,
                 SQ: tl.constexpr, ZQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W [N, K] in the output's dtype, one [BLOCK_N, BLOCK_K] tile per program."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        n2 = offs_n[:, None]
        k2 = offs_k[None, :]
        mask = (n2 < N) & (k2 < K)
        w = _dequant_tile(qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, n2, k2, mask,
                          N, K, MS, MZ, PA, PB, G, AXIS, SQ, ZQ)
        tl.store(w_ptr + n2 * K + k2, w.to(w_ptr.dtype.element_ty), mask=mask)
