"""Matrix products with quantized weights: fused Triton kernels on GPUs, pure torch everywhere else.

``qlinear(x, t, spec)`` computes ``x @ W.T`` for a weight stored in the format of :mod:`.quant`:

- decode (a few rows, T <= ``GEMV_MAX_T``): one fused kernel reads the packed codes, the uint8
  scale/zero codes and their fp16 meta tables straight from the blob, dequantizes in registers and
  accumulates in fp32; the weight is never written out. One token of 2/4-bit axis-1 weights takes
  the dp4a kernel: the activations are first cut into two int8 bytes per value (``quantize_x``,
  ~15 bits kept), then each 32-bit word of codes is masked into 4-code bytes that one dp4a
  instruction multiplies and adds (integer dot products, ~1 instruction per weight); other
  word-aligned weights (3-bit, or T > 1) take the word kernel (``sum_w s_w * (sum_i q_i x_i - z_w *
  sum_i x_i)`` in fp32: per weight one AND/OR, one add, one multiply-add); anything else (axis 0,
  odd group sizes) the element-wise kernel;
- prefill (more rows): a Triton kernel dequantizes the weight to fp16, then cuBLAS multiplies;
- no CUDA, no Triton, or an unsupported dtype: the pure-torch fallback (``quant.dequantize`` +
  ``F.linear``), which is the reference the kernels are tested against.

The kernels use no tensor cores, bf16 or sm80-only instructions, so they build for a T4 (sm_75).
Codes become floats with an exponent trick (OR an exponent onto the masked bits, subtract the
power of two): full-rate integer and float ops instead of the quarter-rate int-to-float unit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .quant import PLANES, QSpec, dequantize

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

GEMV_MAX_T = 4  # rows up to which the fused GEMV beats dequantize + matmul (H200: T=4 w2 479 us vs 671 us)
_CHUNK_T = 4  # rows one GEMV launch handles
_DEQ_BLOCK = (16, 128)  # dequantize kernel tile (rows, columns)
_FUSED_DTYPES = (torch.float16, torch.float32)
_DISABLE = os.environ.get("MIXTRAL_NB_NO_TRITON", "") not in ("", "0")
# one-token GEMV of 2/4-bit weights: "dp4a_shared" (the default: 8-bit activation pairs, integer dot
# products, and 2-bit tiles of rows that share their scale meta; H200, grouped w1+w3 of 2 experts 41.3-41.6
# us vs 41.7-42.3 us for consecutive rows, the same end to end), "dp4a" (consecutive rows everywhere),
# "dp4a_ahead" (dp4a_shared with codes loaded two steps ahead and scale/zero codes one) or "words" (fp16
# activations, float math per weight); an A/B switch for benchmarks
GEMV_METHOD = os.environ.get("MIXTRAL_NB_GEMV", "dp4a_shared")
_QX_WORDS = 64  # words of x one quantize program handles


def available() -> dict[str, Any]:
    """Which fast paths this process can use (reported by the benchmark and the setup notebook)."""
    cuda = torch.cuda.is_available()
    return {"triton": HAVE_TRITON, "triton_version": triton.__version__ if HAVE_TRITON else None,
            "cuda": cuda, "fused": HAVE_TRITON and cuda and not _DISABLE}


def can_fuse(x: Tensor, spec: QSpec) -> bool:
    """Whether the Triton kernels serve activations ``x`` and weights stored as ``spec``."""
    return HAVE_TRITON and not _DISABLE and x.is_cuda and x.dtype in _FUSED_DTYPES and spec.nbits in PLANES


def on_device(x: Tensor) -> Any:
    """Context that makes x's GPU the current device: Triton launches on the current device (and its
    stream, the one being captured), while layers split over GPUs live on cuda:1 and on. The
    context manager costs ~10 us of Python, so it is only entered when the devices differ."""
    if not x.is_cuda or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def qlinear(x: Tensor, t: dict[str, Tensor], spec: QSpec, xq: tuple[Tensor, ...] | None = None) -> Tensor:
    """``x @ W.T`` where W is stored quantized in ``t`` (see ``quant`` for the format); ``xq``: x as
    ``shared_x`` prepared it for several projections of the same x (one quantize_x launch, not one each)."""
    if can_fuse(x, spec):
        lead = x.shape[:-1]
        with on_device(x):
            y = _fused(x.reshape(-1, spec.in_features), t, spec, xq)
        return y.view(*lead, spec.out_features)
    return qlinear_reference(x, t, spec)


def _fused(x2: Tensor, t: dict[str, Tensor], spec: QSpec, xq: tuple[Tensor, ...] | None = None) -> Tensor:
    if x2.shape[0] <= GEMV_MAX_T:
        return qgemv(x2, t, spec, xq=xq)
    return F.linear(x2, dequantize_fused(t, spec, x2.dtype))


def shared_x(x: Tensor, specs: list[QSpec | None]) -> tuple[Tensor, ...] | None:
    """x [1, K] quantized once for the dp4a GEMVs of every spec (e.g. q, k and v of one layer), or
    None when one of them would not take that path or the specs want different word widths."""
    if x.dim() != 2 or x.shape[0] != 1 or not GEMV_METHOD.startswith("dp4a"):
        return None
    if not all(s is not None and can_fuse(x, s) and _plan(s)["dp4a"] for s in specs):
        return None
    widths = {_plan(s)["pa"] for s in specs if s is not None}
    if len(widths) != 1:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    with on_device(x):
        return quantize_x(x, 32 // widths.pop())


def qlinear_reference(x: Tensor, t: dict[str, Tensor], spec: QSpec) -> Tensor:
    """The pure-torch path: dequantize to the activation dtype, then ``F.linear``."""
    return F.linear(x, dequantize(t, spec, x.dtype))


# ---------------------------------------------------------------------------------------------
# launch parameters (computed once per spec)


@functools.lru_cache(maxsize=None)
def _plan(spec: QSpec) -> dict[str, Any]:
    """Per-spec constants for the launchers: plane names and bits, kernel choice, block sizes."""
    planes = PLANES[spec.nbits]
    pa, pb = planes[0], (planes[1] if len(planes) > 1 else 0)
    k, g = spec.in_features, spec.group_size
    per_word = 32 // pa  # values in one 32-bit word of plane A
    # the word kernel: axis-1 groups made of whole words, rows made of whole words in every plane
    words = (spec.nbits in (2, 3, 4) and spec.axis == 1 and g % per_word == 0 and k % per_word == 0
             and (pb == 0 or k % (32 // pb) == 0))
    groups_per_row = k // g if spec.axis == 1 else 0

    def meta_mode(quant: bool, m_meta: int) -> tuple[int, int]:
        """How a group finds its meta entry: 0 one entry, 1 by row (n % R), 2 by modulo."""
        if not quant or m_meta == 1:
            return 0, 1
        if groups_per_row and m_meta % groups_per_row == 0:
            return 1, m_meta // groups_per_row
        return 2, m_meta

    ms = spec.groups // spec.scale_group if spec.quant_scale else 1
    mz = spec.groups // spec.zero_group if spec.quant_zero else 1
    s_mode, s_mod = meta_mode(spec.quant_scale, ms)
    z_mode, z_mod = meta_mode(spec.quant_zero, mz)
    n = spec.out_features
    if words:  # enough programs to fill a GPU (>= 128), as many row tiles per program as that allows
        block_n, warps = 8, 4
        tiles = next(r for r in (4, 2, 1) if r == 1 or -(-n // (block_n * r)) >= 128)
        block_k = (64 if k * pa // 32 >= 768 else 32) * per_word  # 32 or 64 words per row per step
    else:
        block_n, block_k, warps, tiles = 16, 128, 4, 1
    # one-token decode of single-plane 2/4-bit words: integer dot products (dp4a) on 8-bit activations
    dp4a = words and pb == 0 and pa in (2, 4)
    # rows, words per step (H200 sweep, graph-timed: attention-sized 4096x4096 12.6 us at (4, 128) vs
    # 14.4 us at (8, 64); expert-sized matrices best at (8, 64))
    dp4a_block = (4, 128) if n <= 4096 and k <= 4096 else (8, 64)
    # dp4a tiles of rows s_mod apart can share their scale meta (method "dp4a_shared", see _gemv_dp4a's
    # STRIDED); H200, graph-timed: 2-bit g16 w1 15.2 vs 17.1 us, w2 20.3 vs 24.8 us, grouped w1+w3 of 2
    # experts 43.0 vs 44.8 us; 4-bit g64 attention no faster (12.7 vs 12.6 us): 2-bit only
    strided = (dp4a and pa == 2 and s_mode == 1 and n % s_mod == 0
               and (not spec.quant_zero or z_mode == 0 or (z_mode == 1 and z_mod == s_mod)))
    return {"qa": f"q{pa}", "qb": f"q{pb}" if pb else f"q{pa}", "pa": pa, "pb": pb, "words": words,
            "dp4a": dp4a, "dp4a_block": dp4a_block, "strided": strided,
            "block_n": block_n, "block_k": block_k, "warps": warps, "tiles": tiles, "ms": ms, "mz": mz,
            "row_words_a": k * pa // 32, "row_words_b": k * (pb or pa) // 32, "groups_per_row": groups_per_row,
            "s_mode": s_mode, "s_mod": s_mod, "z_mode": z_mode, "z_mod": z_mod}


def _meta_args(t: dict[str, Tensor], spec: QSpec) -> tuple[Tensor, ...]:
    """Scale and zero tensors in kernel-argument order (plain fp16 vectors stand in for the meta)."""
    s = (t["scale_q"], t["scale_ms"], t["scale_mz"]) if spec.quant_scale else (t["scale"],) * 3
    z = (t["zero_q"], t["zero_ms"], t["zero_mz"]) if spec.quant_zero else (t["zero"],) * 3
    return s + z


def qgemv(x: Tensor, t: dict[str, Tensor], spec: QSpec, out: Tensor | None = None, block_n: int | None = None,
          block_k: int | None = None, num_warps: int | None = None, tiles: int | None = None,
          method: str | None = None, xq: tuple[Tensor, ...] | None = None, even: bool | None = None) -> Tensor:
    """Fused dequantize + GEMV for x [T, K] (any T; launched in chunks of 4 rows) -> [T, N].

    Runs wherever Triton runs: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    ``out`` (contiguous [T, N]) lets tests pass a poisoned buffer; the block arguments override
    the tuned defaults (micro-benchmarks; ``block_k`` counts weights, ``tiles`` is the word
    kernel's R: row tiles per program sharing each x load, 1, 2 or 4); ``method`` picks the
    one-row kernel ("dp4a_shared", "dp4a", "dp4a_ahead" or "words", default ``GEMV_METHOD``); ``xq``: a
    one-row x already quantized for the dp4a kernel (``shared_x``); ``even`` False forces the dp4a kernel's
    masked loads (tests; None: unmasked where every tile is whole).
    """
    n = spec.out_features
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device) if out is None else out
    for r in range(0, rows, _CHUNK_T):
        tt = min(_CHUNK_T, rows - r)
        xs, ys = (x, y) if rows <= _CHUNK_T else (x[r:r + tt], y[r:r + tt])
        _launch_gemv(xs, ys, tt, t, spec, None, block_n, block_k, num_warps, tiles, method, xq if rows == 1 else None,
                     even)
    return y


def grouped_split(spec: QSpec) -> int:
    """K splits for a grouped one-token launch of ``spec``: short wide matrices (w2, [4096, 14336])
    need 4 to fill a GPU with consecutive-row tiles (H200, 2 experts, graph-timed: dp4a 27.6 us split 4
    vs 33.4 us unsplit), none with meta-sharing tiles (26.8 us unsplit, 29.0 us split 4)."""
    p = _plan(spec)
    if not p["words"] or 2 * spec.out_features > spec.in_features:
        return 1
    return 1 if GEMV_METHOD == "dp4a_shared" and _meta_sharing(spec, p["dp4a_block"][0], GEMV_METHOD) else 4


def _meta_sharing(spec: QSpec, block_n: int, method: str) -> bool:
    """Whether a dp4a launch of ``spec`` with ``block_n`` rows per tile takes rows that share their
    scale meta (``_gemv_dp4a``'s STRIDED): methods dp4a_shared and dp4a_ahead, where the layout allows."""
    p = _plan(spec)
    return (method in ("dp4a_shared", "dp4a_ahead") and p["strided"]
            and (spec.out_features // p["s_mod"]) % block_n == 0)


def qgemv_grouped(x: Tensor, t: dict[str, Tensor], spec: QSpec, slots: Tensor, slot_bytes: int,
                  mats_per_slot: int = 1, mat_bytes: int = 0, out: Tensor | None = None, split: int = 1,
                  **blocks: Any) -> Tensor:
    """One launch for several matrices of one token: ``y[m] = x_m @ W_m.T`` -> [M, N].

    W_m is the matrix whose tensors sit at ``t``'s addresses plus ``slots[m // mats_per_slot] *
    slot_bytes + (m % mats_per_slot) * mat_bytes`` bytes: ``t`` views slot 0 of a buffer of equal
    slots (the expert cache), ``slots`` is an int32 tensor on the device, so which experts run is
    decided on the GPU with no host sync (and the launch can be captured in a CUDA graph).
    x is [1, K] (shared by every matrix, e.g. w1 and w3) or [M, K] (one row each, e.g. w2).
    ``split`` > 1 (word kernel only) splits K over that many programs per row tile, for short wide
    matrices like w2 ([4096, 14336]: too few row tiles to fill a GPU): the result is then the fp32
    partial sums [split, M, N], to be summed by the caller (who usually sums over experts too).
    ``blocks``: ``qgemv``'s block_n / block_k / num_warps / method overrides (micro-benchmarks).
    """
    m = slots.numel() * mats_per_slot
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert x.shape[0] in (1, m), f"x has {x.shape[0]} rows for {m} matrices"
    split = split if _plan(spec)["words"] else 1
    if split > 1:
        y = torch.empty(split, m, spec.out_features, dtype=torch.float32, device=x.device) if out is None else out
    else:
        y = torch.empty(m, spec.out_features, dtype=x.dtype, device=x.device) if out is None else out
    group = (slots, slot_bytes, mat_bytes, x.stride(0) if x.shape[0] > 1 else 0, y.stride(-2), mats_per_slot, m,
             y.stride(0) if split > 1 else 0, split)
    with on_device(x):
        _launch_gemv(x, y, 1, t, spec, group, **blocks)
    return y


def _launch_gemv(xs: Tensor, ys: Tensor, tt: int, t: dict[str, Tensor], spec: QSpec, group: tuple | None,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 tiles: int | None = None, method: str | None = None, xq: tuple[Tensor, ...] | None = None,
                 even: bool | None = None) -> None:
    """One kernel launch for up to 4 rows (or, with ``group``, one row of several matrices); ``xq``:
    the row already quantized for the dp4a kernel (``shared_x``); ``even``: see ``qgemv``."""
    p = _plan(spec)
    n, k = spec.out_features, spec.in_features
    bn, bk, nw = block_n or p["block_n"], block_k or p["block_k"], num_warps or p["warps"]
    tensors = (t[p["qa"]], t[p["qb"]], *_meta_args(t, spec))
    if group is None:
        group = (xs, 0, 0, 0, 0, 0, 1, 0, 1)
    slots, slot_bytes, mat_bytes, x_m, y_m, mps, m, y_s, split = group
    grouping = (slots, slot_bytes, mat_bytes, x_m, y_m)
    sx, sy = xs.stride(0), ys.stride(-2)
    meth = method or GEMV_METHOD
    if tt == 1 and p["dp4a"] and meth.startswith("dp4a"):
        bn, bw = block_n or p["dp4a_block"][0], (block_k * p["pa"] // 32 if block_k else p["dp4a_block"][1])
        try:
            xh, xl, xd, xsum = xq if xq is not None else quantize_x(xs, 32 // p["pa"])
            args = (xh, xl, xd, xsum, ys, t[p["qa"]], *_meta_args(t, spec), slots, slot_bytes, mat_bytes,
                    1 if x_m else 0, y_m, words_per_split(p["row_words_a"], split, bw), y_s, n, p["row_words_a"],
                    p["groups_per_row"], p["s_mod"], p["z_mod"], p["pa"], spec.group_size, spec.quant_scale,
                    spec.quant_zero, p["s_mode"], p["z_mode"], mps, bn, bw, xs.is_cuda, meth == "dp4a_ahead",
                    _meta_sharing(spec, bn, meth))
            even = _whole_tiles(n, bn, bw, split, p["row_words_a"]) if even is None else even
            _gemv_dp4a[(triton.cdiv(n, bn), m, split)](*args, even, num_warps=num_warps or 4)
            return
        except Exception as e:  # a Triton/GPU that cannot build it (inline PTX): the fp32 kernel decodes on
            if method:
                raise
            _give_up_dp4a(e)
    if p["words"]:
        r_tiles = min(tiles or p["tiles"], _CHUNK_T // tt)  # R * T <= 4 accumulators
        bw = max(1, bk * p["pa"] // 32)
        wps = words_per_split(p["row_words_a"], split, bw)
        args = (xs, ys, *tensors, *grouping, wps, y_s, n, p["row_words_a"], p["row_words_b"], p["groups_per_row"],
                p["s_mod"], p["z_mod"], sx, sy, tt, r_tiles, p["pa"], p["pb"], spec.group_size, spec.quant_scale,
                spec.quant_zero, p["s_mode"], p["z_mode"], mps, bn, bw)
        _gemv_words[(triton.cdiv(n, bn * r_tiles), m, split)](*args, num_warps=nw)
    else:
        args = (xs, ys, *tensors, *grouping, n, k, p["ms"], p["mz"], sx, sy, tt, p["pa"], p["pb"], spec.group_size,
                spec.axis, spec.quant_scale, spec.quant_zero, mps, bn, bk)
        _gemv_generic[(triton.cdiv(n, bn), m)](*args, num_warps=nw)


def words_per_split(row_words: int, split: int, block_w: int) -> int:
    """Words of a row that each of ``split`` K splits owns: whole blocks of ``block_w``, so only the
    last split may come up short (its blocks past the row's end are masked off)."""
    return -(-row_words // (split * block_w)) * block_w


def _whole_tiles(n: int, block_n: int, block_w: int, split: int, row_words: int) -> bool:
    """Whether every dp4a tile is whole: rows a multiple of ``block_n``, and the ``split`` K ranges
    whole blocks of ``block_w`` words that fill the row exactly. Then the kernel's loads need no masks
    (H200, grouped w1+w3 of 2 experts: 40.9-41.7 us vs 44.0-44.4 us masked)."""
    return n % block_n == 0 and words_per_split(row_words, split, block_w) * split == row_words


def _give_up_dp4a(e: Exception) -> None:
    """Switch this process to the word kernel after the dp4a kernel failed to build or launch."""
    global GEMV_METHOD
    GEMV_METHOD = "words"
    warnings.warn(f"the dp4a GEMV kernel failed ({type(e).__name__}: {str(e)[:200]}); using the fp32 word kernel "
                  "(slower; set MIXTRAL_NB_GEMV=words to skip the attempt)", RuntimeWarning, stacklevel=4)


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
    _quantize_x[(triton.cdiv(words, _QX_WORDS), rows)](x, xh, xl, xd, xsum, words, x.stride(0), VW=vw, CW=_QX_WORDS,
                                                        num_warps=4)
    return xh, xl, xd, xsum


def dequantize_fused(t: dict[str, Tensor], spec: QSpec, dtype: torch.dtype = torch.float16,
                     out: Tensor | None = None) -> Tensor:
    """The weight [N, K] in ``dtype`` (or into contiguous ``out``), dequantized by a Triton kernel."""
    p = _plan(spec)
    n, k = spec.out_features, spec.in_features
    w = torch.empty(n, k, dtype=dtype, device=t[p["qa"]].device) if out is None else out
    bn, bk = _DEQ_BLOCK
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    tensors = (t[p["qa"]], t[p["qb"]], *_meta_args(t, spec))
    args = (w, *tensors, n, k, p["ms"], p["mz"], p["pa"], p["pb"], spec.group_size, spec.axis, spec.quant_scale,
            spec.quant_zero, bn, bk)
    _dequant[grid](*args, num_warps=4)
    return w


def warmup(specs: list[QSpec], device: torch.device | str, dtype: torch.dtype = torch.float16) -> None:
    """Compile every kernel variant ``specs`` will use (T = 1..4 and the prefill path) up front."""
    if not (HAVE_TRITON and torch.device(device).type == "cuda"):
        return
    for spec in dict.fromkeys(specs):
        t = {s.name: torch.zeros(s.shape, dtype=s.dtype, device=device) for s in spec.layout().segments}
        for rows in (1, 2, 3, 4, GEMV_MAX_T + 1):
            qlinear(torch.ones(rows, spec.in_features, dtype=dtype, device=device), t, spec)
    torch.cuda.synchronize(device)


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
    def _grouped_pointers(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
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
    def _ld(ptr, mask, other, EVEN: tl.constexpr):
        """``tl.load``, unmasked when EVEN (the launcher checked that every address is in range): a
        masked load also costs a predicate and zeroing its registers, per load per step."""
        if EVEN:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=mask, other=other)

    @triton.jit
    def _sz_load(ptr, ms_ptr, mz_ptr, rows, kg, mw, N, MOD, GPR, MROW, QUANT: tl.constexpr, MODE: tl.constexpr,
                 SHARED: tl.constexpr, EVEN: tl.constexpr = False):
        """The raw loads behind ``_scale_or_zero`` (8-bit codes or fp16 values, and the gathered meta
        entries), unconverted, so a loop can issue them a step before they are used. SHARED (mode 1):
        every row of the tile has ``row % MOD == MROW``, so one row of meta entries serves them all."""
        c = rows[:, None] * GPR + kg[None, :]
        mask = (rows[:, None] < N) & mw[None, :]
        if QUANT:
            raw = _ld(ptr + c, mask, 0, EVEN)
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
                mz = _ld(mz_ptr + mi, mmask, 0.0, EVEN)
                return raw, _ld(ms_ptr + mi, mmask, 0.0, EVEN), mz
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
    def _scale_or_zero(ptr, ms_ptr, mz_ptr, rows, kg, mw, N, MOD, GPR, ms0, mz0,
                       QUANT: tl.constexpr, MODE: tl.constexpr, MROW=0, SHARED: tl.constexpr = False,
                       EVEN: tl.constexpr = False):
        """Step sizes or zero points of the groups of words ``kg`` of ``rows`` (see ``_plan.meta_mode``;
        MROW, SHARED, EVEN: see ``_sz_load`` and ``_ld``)."""
        raw, ms, mz = _sz_load(ptr, ms_ptr, mz_ptr, rows, kg, mw, N, MOD, GPR, MROW, QUANT, MODE, SHARED, EVEN)
        return _sz_value(raw, ms, mz, ms0, mz0, QUANT, MODE)

    @triton.jit
    def _single_meta(ms_ptr, mz_ptr, QUANT: tl.constexpr, MODE: tl.constexpr):
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
    def _load_words(qa_w, qb_w, rows, offs_w, N, ROW_WA, ROW_WB, PB: tl.constexpr,
                    EVEN: tl.constexpr = False):
        """Raw words of a [BLOCK_N, BLOCK_W] tile: plane A, and plane B shifted to the same weights
        (3-bit only; 0 otherwise). Words past the row's end read as 0 (EVEN: see ``_ld``)."""
        w2 = offs_w[None, :]
        mask = (rows[:, None] < N) & (w2 < ROW_WA)
        a = _ld(qa_w + rows[:, None] * ROW_WA + w2, mask, 0, EVEN)
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
    def _gemv_words(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
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
            x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = _grouped_pointers(
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
        ms0, mz0 = _single_meta(sms_ptr, smz_ptr, SQ, S_MODE)
        zms0, zmz0 = _single_meta(zms_ptr, zmz_ptr, ZQ, Z_MODE)
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
        a0, b0 = _load_words(qa_w, qb_w, rows0, offs_w, N, ROW_WA, ROW_WB, PB)
        if R > 1:
            a1, b1 = _load_words(qa_w, qb_w, rows1, offs_w, N, ROW_WA, ROW_WB, PB)
        if R > 2:
            a2, b2 = _load_words(qa_w, qb_w, rows2, offs_w, N, ROW_WA, ROW_WB, PB)
            a3, b3 = _load_words(qa_w, qb_w, rows3, offs_w, N, ROW_WA, ROW_WB, PB)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mw = offs_w < w_hi
            next_w = offs_w + BLOCK_W
            lo0, hi0 = _halves(a0)
            c0 = b0
            a0, b0 = _load_words(qa_w, qb_w, rows0, next_w, N, ROW_WA, ROW_WB, PB)
            lo1, hi1, c1 = lo0, hi0, c0
            lo2, hi2, c2 = lo0, hi0, c0
            lo3, hi3, c3 = lo0, hi0, c0
            if R > 1:
                lo1, hi1 = _halves(a1)
                c1 = b1
                a1, b1 = _load_words(qa_w, qb_w, rows1, next_w, N, ROW_WA, ROW_WB, PB)
            if R > 2:
                lo2, hi2 = _halves(a2)
                c2 = b2
                a2, b2 = _load_words(qa_w, qb_w, rows2, next_w, N, ROW_WA, ROW_WB, PB)
                lo3, hi3 = _halves(a3)
                c3 = b3
                a3, b3 = _load_words(qa_w, qb_w, rows3, next_w, N, ROW_WA, ROW_WB, PB)
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
            s0 = _scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows0, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
            z0 = _scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows0, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
            s1, s2, s3, z1, z2, z3 = s0, s0, s0, z0, z0, z0
            if R > 1:
                s1 = _scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows1, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
                z1 = _scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows1, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
            if R > 2:
                s2 = _scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows2, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
                z2 = _scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows2, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
                s3 = _scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows3, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE)
                z3 = _scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows3, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE)
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
    def _quantize_x(x_ptr, xh_ptr, xl_ptr, xd_ptr, xs_ptr, ROW_W, stride_x, VW: tl.constexpr, CW: tl.constexpr):
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
    def _next_words(w0, k: tl.constexpr, w_lo, w_hi, aw, BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
        """Word offsets of the block ``k`` blocks after the one at ``w0``, for loading it early. Past the
        end: the words that follow (masked off by the row end), or with EVEN (unmasked loads) the first
        block again, so that no load leaves the matrix."""
        nxt = w0 + k * BLOCK_W
        if EVEN:
            nxt = tl.where(nxt < w_hi, nxt, w_lo)
        return nxt + aw

    @triton.jit
    def _gemv_dp4a(xh_ptr, xl_ptr, xd_ptr, xs_ptr, y_ptr, qa_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                   slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, WPS, Y_S, N, ROW_W, GPR, S_MOD, Z_MOD,
                   PA: tl.constexpr, G: tl.constexpr, SQ: tl.constexpr, ZQ: tl.constexpr, S_MODE: tl.constexpr,
                   Z_MODE: tl.constexpr, MPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                   ASM: tl.constexpr, AHEAD: tl.constexpr, STRIDED: tl.constexpr, EVEN: tl.constexpr = False):
        """One token, 2/4-bit words: y[n] = sum_w s_w * (dx_w * sum_i q_i (256 h_i + l_i) - z_w * sum_i x_i).

        The codes of a word are masked into bytes (``(word >> PA*j) & 0x0303..``) and multiplied with
        the matching activation bytes by dp4a: per 4 weights one shift/AND and two dp4a (high and
        low activation bytes), against ~3 float ops per weight in ``_gemv_words``. X_M = 1: matrix m
        of a grouped launch has its own activation row m (else all share row 0). AHEAD: the weight
        codes are loaded two steps ahead (one otherwise) and the scale and zero codes (and their meta
        entries) one step ahead instead of in the step that uses them. STRIDED (scale meta by row,
        mode 1, zero meta mode 0 or the same): a program's rows are S_MOD apart, so they share their
        scale meta entries, gathered once per step for the tile instead of once per row. EVEN: every
        tile is whole (rows, and words of every K split), so no load needs a mask.
        """
        VW: tl.constexpr = 32 // PA
        J: tl.constexpr = VW // 4
        WPG: tl.constexpr = G // VW
        MASK: tl.constexpr = ((1 << PA) - 1) * 0x01010101
        if MPS > 0:  # the weights at matrix m's slot; its activation row m when X_M is 1
            xh_ptr, y_ptr, qa_ptr, _, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = _grouped_pointers(
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
        ms0, mz0 = _single_meta(sms_ptr, smz_ptr, SQ, S_MODE)
        zms0, zmz0 = _single_meta(zms_ptr, zmz_ptr, ZQ, Z_MODE)
        acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        w_lo = tl.program_id(2) * WPS
        w_hi = tl.minimum(w_lo + WPS, ROW_W)
        y_ptr += tl.program_id(2) * Y_S
        a, _ = _load_words(qa_w, qa_w, rows, w_lo + aw, N, ROW_W, ROW_W, 0, EVEN)
        if AHEAD:  # codes two steps ahead (the compiler issues a prefetch late in the step), scales one
            a2, _ = _load_words(qa_w, qa_w, rows, _next_words(w_lo, 1, w_lo, w_hi, aw, BLOCK_W, EVEN), N, ROW_W, ROW_W,
                                0, EVEN)
            first = w_lo + aw
            sr, sms, smz = _sz_load(s_ptr, sms_ptr, smz_ptr, rows, first // WPG, first < w_hi, N, S_MOD, GPR, mrow, SQ,
                                    S_MODE, STRIDED, EVEN)
            zr, zms, zmz = _sz_load(z_ptr, zms_ptr, zmz_ptr, rows, first // WPG, first < w_hi, N, Z_MOD, GPR, mrow, ZQ,
                                    Z_MODE, STRIDED, EVEN)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            offs_w = w0 + aw
            mw = offs_w < w_hi
            cur = a
            if AHEAD:
                a = a2
                a2, _ = _load_words(qa_w, qa_w, rows, _next_words(w0, 2, w_lo, w_hi, aw, BLOCK_W, EVEN), N, ROW_W,
                                    ROW_W, 0, EVEN)
            else:  # the next block's codes
                a, _ = _load_words(qa_w, qa_w, rows, _next_words(w0, 1, w_lo, w_hi, aw, BLOCK_W, EVEN), N, ROW_W,
                                   ROW_W, 0, EVEN)
            if AHEAD:
                s = _sz_value(sr, sms, smz, ms0, mz0, SQ, S_MODE)
                z = _sz_value(zr, zms, zmz, zms0, zmz0, ZQ, Z_MODE)
                nxt = _next_words(w0, 1, w_lo, w_hi, aw, BLOCK_W, EVEN)
                sr, sms, smz = _sz_load(s_ptr, sms_ptr, smz_ptr, rows, nxt // WPG, nxt < w_hi, N, S_MOD, GPR, mrow, SQ,
                                        S_MODE, STRIDED, EVEN)
                zr, zms, zmz = _sz_load(z_ptr, zms_ptr, zmz_ptr, rows, nxt // WPG, nxt < w_hi, N, Z_MOD, GPR, mrow, ZQ,
                                        Z_MODE, STRIDED, EVEN)
            ih = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
            il = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
            for j in tl.static_range(J):
                c = (cur >> (PA * j)) & MASK
                xh = _ld(xh_ptr + j * ROW_W + offs_w, mw, 0, EVEN)
                xl = _ld(xl_ptr + j * ROW_W + offs_w, mw, 0, EVEN)
                ih = _dp4a(c, tl.broadcast_to(xh[None, :], [BLOCK_N, BLOCK_W]), ih, ASM)
                il = _dp4a(c, tl.broadcast_to(xl[None, :], [BLOCK_N, BLOCK_W]), il, ASM)
            xd = _ld(xd_ptr + offs_w, mw, 0.0, EVEN)
            xs = _ld(xs_ptr + offs_w, mw, 0.0, EVEN)
            d = _exact_float(ih * 256 + il) * xd[None, :]
            if not AHEAD:
                kg = offs_w // WPG
                s = _scale_or_zero(s_ptr, sms_ptr, smz_ptr, rows, kg, mw, N, S_MOD, GPR, ms0, mz0, SQ, S_MODE, mrow,
                                   STRIDED, EVEN)
                z = _scale_or_zero(z_ptr, zms_ptr, zmz_ptr, rows, kg, mw, N, Z_MOD, GPR, zms0, zmz0, ZQ, Z_MODE, mrow,
                                   STRIDED, EVEN)
            acc += s * (d - z * xs[None, :])
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _dequant_tile(qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, n2, k2, mask, N, K, MS, MZ,
                      PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr,
                      SQ: tl.constexpr, ZQ: tl.constexpr):
        """Weights W[n2, k2] in float32, each element indexing its own byte, scale and zero."""
        VA: tl.constexpr = 8 // PA
        a = tl.load(qa_ptr + n2 * (K // VA) + k2 // VA, mask=mask, other=0).to(tl.int32)
        code = (a >> (PA * (k2 % VA))) & ((1 << PA) - 1)
        if PB > 0:
            VB: tl.constexpr = 8 // PB
            b = tl.load(qb_ptr + n2 * (K // VB) + k2 // VB, mask=mask, other=0).to(tl.int32)
            code = code | (((b >> (PB * (k2 % VB))) & ((1 << PB) - 1)) << PA)
        if AXIS == 1:
            c = n2 * (K // G) + k2 // G
        else:
            c = (n2 % (N // G)) * K + k2
        s = _group_meta(s_ptr, sms_ptr, smz_ptr, c, mask, MS, SQ)
        z = _group_meta(z_ptr, zms_ptr, zmz_ptr, c, mask, MZ, ZQ)
        return (_to_f32(code) - z) * s

    @triton.jit
    def _gemv_generic(x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                      slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, N, K, MS, MZ, stride_x, stride_y,
                      T: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr,
                      SQ: tl.constexpr, ZQ: tl.constexpr, MPS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """Any axis and group size: dequantize a [BLOCK_N, BLOCK_K] tile element-wise, then dot."""
        if MPS > 0:
            x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr = _grouped_pointers(
                x_ptr, y_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr,
                slot_ptr, SLOT_BYTES, MAT_BYTES, X_M, Y_M, MPS)
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n2 = offs_n[:, None]
        acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k2 = offs_k[None, :]
            mk = offs_k < K
            w = _dequant_tile(qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, n2, k2,
                              (n2 < N) & (k2 < K), N, K, MS, MZ, PA, PB, G, AXIS, SQ, ZQ)
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
        mn = offs_n < N
        out = y_ptr + offs_n
        tl.store(out, acc0.to(y_ptr.dtype.element_ty), mask=mn)
        if T > 1:
            tl.store(out + stride_y, acc1.to(y_ptr.dtype.element_ty), mask=mn)
        if T > 2:
            tl.store(out + 2 * stride_y, acc2.to(y_ptr.dtype.element_ty), mask=mn)
        if T > 3:
            tl.store(out + 3 * stride_y, acc3.to(y_ptr.dtype.element_ty), mask=mn)

    @triton.jit
    def _dequant(w_ptr, qa_ptr, qb_ptr, s_ptr, sms_ptr, smz_ptr, z_ptr, zms_ptr, zmz_ptr, N, K, MS, MZ,
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
