"""Matrix products with quantized weights: which kernel runs is decided by the weight's shape and
format and by what the device can build, nothing else.

``qlinear(x, t, spec)`` computes ``x @ W.T`` for a weight stored in the format of :mod:`..quant`:

- decode (T <= ``GEMV_MAX_T`` rows): one fused kernel reads the packed codes, the uint8 scale/zero
  codes and their fp16 meta tables straight from the blob, dequantizes in registers and accumulates
  in fp32; the weight is never written out. One token of 2/4-bit axis-1 weights takes the dp4a
  kernel (:mod:`.dp4a`), on tiles of rows that share their scale meta for 2-bit weights and of
  consecutive rows for 4-bit ones; other word-aligned weights (3-bit, or T = 2..4) take the fp32
  word kernel (:mod:`.words`); axis-0 weights (the article's files) the axis-0 kernel, whose programs
  each take the rows that share a column's scale and zero; anything else (odd group sizes) the
  element-wise kernel;
- prefill (more rows): a Triton kernel dequantizes the weight to fp16, then cuBLAS multiplies;
- no CUDA, no Triton, an unsupported dtype, or a device where the kernels failed to build
  (:mod:`.capability`): the pure-torch path (``quant.dequantize`` + ``F.linear``), which is also
  the reference the kernels are tested against.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import article_quant_config
from ..expert import ExpertFormat
from ..quant import PLANES, QSpec, dequantize
from . import dp4a, fused, words
from .capability import CAPABILITIES, HAVE_TRITON, on_device, triton

GEMV_MAX_T = 4  # rows up to which the fused GEMV beats dequantize + matmul
_CHUNK_T = 4  # rows one GEMV launch handles
_FUSED_DTYPES = (torch.float16, torch.float32)
# kernels a caller may name (tests, micro-benchmarks): one-token dp4a, the word kernel, the axis-0 kernel, the
# element-wise kernel
METHODS = ("dp4a_shared", "dp4a", "words", "axis0", "generic")


def available() -> dict[str, Any]:
    """Which fast paths this process can use (reported by the benchmark and the setup notebook)."""
    cuda = torch.cuda.is_available()
    return {"triton": HAVE_TRITON, "triton_version": triton.__version__ if HAVE_TRITON else None,
            "cuda": cuda, "fused": HAVE_TRITON and cuda, "failed": CAPABILITIES.failures()}


def can_fuse(x: Tensor, spec: QSpec) -> bool:
    """Whether the Triton kernels serve activations ``x`` and weights stored as ``spec``."""
    return (HAVE_TRITON and x.is_cuda and x.dtype in _FUSED_DTYPES and spec.nbits in PLANES
            and CAPABILITIES.works(x.device, "gemv"))


def qlinear(x: Tensor, t: dict[str, Tensor], spec: QSpec, xq: tuple[Tensor, ...] | None = None) -> Tensor:
    """``x @ W.T`` where W is stored quantized in ``t`` (see ``quant`` for the format); ``xq``: x as
    ``shared_x`` prepared it for several projections of the same x (one quantize_x launch, not one each)."""
    if can_fuse(x, spec):
        lead = x.shape[:-1]
        try:
            with on_device(x):
                y = _fused(x.reshape(-1, spec.in_features), t, spec, xq)
            return y.view(*lead, spec.out_features)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a Triton/GPU that cannot build the kernels: this device goes pure-torch
            CAPABILITIES.fail(x.device, "gemv", e)
    return qlinear_reference(x, t, spec)


def _fused(x2: Tensor, t: dict[str, Tensor], spec: QSpec, xq: tuple[Tensor, ...] | None = None) -> Tensor:
    if x2.shape[0] <= GEMV_MAX_T:
        return qgemv(x2, t, spec, xq=xq)
    return F.linear(x2, dequantize_fused(t, spec, x2.dtype))


def shared_x(x: Tensor, specs: list[QSpec | None]) -> tuple[Tensor, ...] | None:
    """x [1, K] quantized once for the dp4a GEMVs of every spec (e.g. q, k and v of one layer), or
    None when one of them would not take that path or the specs want different word widths."""
    if x.dim() != 2 or x.shape[0] != 1 or not CAPABILITIES.works(x.device, "dp4a"):
        return None
    if not all(s is not None and can_fuse(x, s) and plan(s)["dp4a"] for s in specs):
        return None
    widths = {plan(s)["pa"] for s in specs if s is not None}
    if len(widths) != 1:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    with on_device(x):
        return dp4a.quantize_x(x, 32 // widths.pop())


def qlinear_reference(x: Tensor, t: dict[str, Tensor], spec: QSpec) -> Tensor:
    """The pure-torch path: dequantize to the activation dtype, then ``F.linear``."""
    return F.linear(x, dequantize(t, spec, x.dtype))


# ---------------------------------------------------------------------------------------------
# the policy: launch parameters per spec (computed once)


@functools.lru_cache(maxsize=None)
def plan(spec: QSpec) -> dict[str, Any]:
    """Per-spec constants for the launchers: plane names and bits, which kernels apply, block sizes.

    ``words``: the word kernel applies (axis-1 groups and rows of whole 32-bit words); ``dp4a``: the
    one-token dp4a kernel applies (single-plane 2/4-bit words); ``strided``: dp4a tiles may take rows
    ``s_mod`` apart that share their scale meta (2-bit only: 4-bit tiles keep consecutive rows).
    Meta modes (how a group finds its meta entry): 0 one entry, 1 by row (n % R), 2 by modulo.
    """
    planes = PLANES[spec.nbits]
    pa, pb = planes[0], (planes[1] if len(planes) > 1 else 0)
    k, g = spec.in_features, spec.group_size
    per_word = 32 // pa  # values in one 32-bit word of plane A
    use_words = (spec.nbits in (2, 3, 4) and spec.axis == 1 and g % per_word == 0 and k % per_word == 0
                 and (pb == 0 or k % (32 // pb) == 0))
    groups_per_row = k // g if spec.axis == 1 else 0

    def meta_mode(quant: bool, m_meta: int) -> tuple[int, int]:
        if not quant or m_meta == 1:
            return 0, 1
        if groups_per_row and m_meta % groups_per_row == 0:
            return 1, m_meta // groups_per_row
        return 2, m_meta

    ms = spec.groups // spec.scale_group if spec.quant_scale else 1
    mz = spec.groups // spec.zero_group if spec.quant_zero else 1

    def axis0_meta_mode(quant: bool, m_meta: int) -> int:  # see words._axis0_meta
        return 0 if not quant or m_meta == 1 else 1 if m_meta >= per_word else 2

    s_mode, s_mod = meta_mode(spec.quant_scale, ms)
    z_mode, z_mod = meta_mode(spec.quant_zero, mz)
    n = spec.out_features
    if use_words:  # enough programs to fill a GPU (>= 128), as many row tiles per program as that allows
        block_n, warps = 8, 4
        tiles = next(r for r in (4, 2, 1) if r == 1 or -(-n // (block_n * r)) >= 128)
        block_k = (64 if k * pa // 32 >= 768 else 32) * per_word  # 32 or 64 words per row per step
    else:
        block_n, block_k, warps, tiles = 16, 128, 4, 1
    use_dp4a = use_words and pb == 0 and pa in (2, 4)
    # axis 0 (the article's files): a program takes up to 16 of the G rows that share their meta, so G must
    # be a power of two (a Triton block), and reads rows of whole words of one plane (2/4-bit). Blocks (words,
    # warps) timed on the H200: 2-bit 128 x 4 (w1 22 us, w2 21 us); 4-bit 256 x 8 (q/o 9.6 us, k/v 6.8 us,
    # against 10.5 and 8.9 at 128 x 4)
    use_axis0 = spec.axis == 0 and g & (g - 1) == 0 and g <= 256 and pb == 0 and pa in (2, 4) and k % per_word == 0
    axis0_rows = min(g, 16)
    # rows, words per step: attention-sized matrices best at (4, 128), expert-sized ones at (8, 64)
    dp4a_block = (4, 128) if n <= 4096 and k <= 4096 else (8, 64)
    strided = (use_dp4a and pa == 2 and s_mode == 1 and n % s_mod == 0
               and (not spec.quant_zero or z_mode == 0 or (z_mode == 1 and z_mod == s_mod)))
    return {"qa": f"q{pa}", "qb": f"q{pb}" if pb else f"q{pa}", "pa": pa, "pb": pb, "words": use_words,
            "dp4a": use_dp4a, "dp4a_block": dp4a_block, "strided": strided,
            "axis0": use_axis0, "axis0_rows": axis0_rows, "axis0_block_w": 256 if pa == 4 else 128,
            "axis0_warps": 8 if pa == 4 else 4,
            "axis0_s_mode": axis0_meta_mode(spec.quant_scale, ms), "axis0_z_mode": axis0_meta_mode(spec.quant_zero, mz),
            "block_n": block_n, "block_k": block_k, "warps": warps, "tiles": tiles, "ms": ms, "mz": mz,
            "row_words_a": k * pa // 32, "row_words_b": k * (pb or pa) // 32, "groups_per_row": groups_per_row,
            "s_mode": s_mode, "s_mod": s_mod, "z_mode": z_mode, "z_mod": z_mod}


def meta_sharing(spec: QSpec, block_n: int) -> bool:
    """Whether dp4a tiles of ``block_n`` rows of ``spec`` can take rows that share their scale meta."""
    p = plan(spec)
    return p["strided"] and (spec.out_features // p["s_mod"]) % block_n == 0


def grouped_split(spec: QSpec, device: torch.device | None = None) -> int:
    """K splits for a grouped one-token launch of ``spec`` on ``device``: short wide matrices (w2,
    [4096, 14336]) need 4 to fill a GPU with consecutive-row tiles, none with meta-sharing dp4a tiles."""
    p = plan(spec)
    if not p["words"] or 2 * spec.out_features > spec.in_features:
        return 1
    dp4a_ok = device is None or CAPABILITIES.works(device, "dp4a")
    return 1 if dp4a_ok and p["dp4a"] and meta_sharing(spec, p["dp4a_block"][0]) else 4


# ---------------------------------------------------------------------------------------------
# launches


def qgemv(x: Tensor, t: dict[str, Tensor], spec: QSpec, out: Tensor | None = None, block_n: int | None = None,
          block_k: int | None = None, num_warps: int | None = None, tiles: int | None = None,
          method: str | None = None, xq: tuple[Tensor, ...] | None = None, even: bool | None = None) -> Tensor:
    """Fused dequantize + GEMV for x [T, K] (any T; launched in chunks of 4 rows) -> [T, N].

    Runs wherever Triton runs: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    ``out`` (contiguous [T, N]) lets tests pass a poisoned buffer; the block arguments override
    the tuned defaults (micro-benchmarks; ``block_k`` counts weights, ``tiles`` is the word
    kernel's R: row tiles per program sharing each x load, 1, 2 or 4); ``method`` names the
    one-row kernel where it applies (one of ``METHODS``; None: the policy's choice); ``xq``: a
    one-row x already quantized for the dp4a kernel (``shared_x``); ``even`` False forces the dp4a
    kernel's masked loads (tests; None: unmasked where every tile is whole).
    """
    _check_method(method)
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


def qgemv_grouped(x: Tensor, t: dict[str, Tensor], spec: QSpec, slots: Tensor, slot_bytes: int,
                  mats_per_slot: int = 1, mat_bytes: int = 0, out: Tensor | None = None, split: int = 1,
                  **blocks: Any) -> Tensor:
    """One launch for several matrices of one token: ``y[m] = x_m @ W_m.T`` -> [M, N].

    W_m is the matrix whose tensors sit at ``t``'s addresses plus ``slots[m // mats_per_slot] *
    slot_bytes + (m % mats_per_slot) * mat_bytes`` bytes: ``t`` views slot 0 of a buffer of equal
    slots (the expert cache), ``slots`` is an int32 tensor on the device, so which experts run is
    decided on the GPU with no host sync (and the launch can be captured in a CUDA graph).
    x is [1, K] (shared by every matrix, e.g. w1 and w3) or [M, K] (one row each, e.g. w2).
    ``split`` > 1 (word-aligned weights only) splits K over that many programs per row tile, for
    short wide matrices like w2 (``grouped_split``): the result is then the fp32 partial sums
    [split, M, N], to be summed by the caller (who usually sums over experts too).
    ``blocks``: ``qgemv``'s block_n / block_k / num_warps / method overrides (micro-benchmarks).
    """
    _check_method(blocks.get("method"))
    m = slots.numel() * mats_per_slot
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.shape[0] not in (1, m):
        raise ValueError(f"qgemv_grouped: x has {x.shape[0]} rows for {m} matrices: give 1 row (shared) or {m}")
    split = split if plan(spec)["words"] else 1
    if split > 1:
        y = torch.empty(split, m, spec.out_features, dtype=torch.float32, device=x.device) if out is None else out
    else:
        y = torch.empty(m, spec.out_features, dtype=x.dtype, device=x.device) if out is None else out
    group = (slots, slot_bytes, mat_bytes, x.stride(0) if x.shape[0] > 1 else 0, y.stride(-2), mats_per_slot, m,
             y.stride(0) if split > 1 else 0, split)
    with on_device(x):
        _launch_gemv(x, y, 1, t, spec, group, **blocks)
    return y


def _check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown GEMV method {method!r}: use one of {', '.join(METHODS)} (or None: the policy's)")


def _launch_gemv(xs: Tensor, ys: Tensor, tt: int, t: dict[str, Tensor], spec: QSpec, group: tuple | None,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 tiles: int | None = None, method: str | None = None, xq: tuple[Tensor, ...] | None = None,
                 even: bool | None = None) -> None:
    """One kernel launch for up to 4 rows (or, with ``group``, one row of several matrices).

    ``group``: (slots, slot_bytes, mat_bytes, x row stride per matrix, y row stride per matrix,
    matrices per slot, matrices, y stride per K split, K splits); None: a plain launch.
    """
    p = plan(spec)
    if method == "axis0" and not p["axis0"]:
        raise ValueError(f"the axis-0 kernel takes axis-0 weights with a power-of-two group, not {spec}")
    if group is None:
        group = (xs, 0, 0, 0, 0, 0, 1, 0, 1)
    dp4a_wanted = method in (None, "dp4a_shared", "dp4a") and (method is not None
                                                              or CAPABILITIES.works(xs.device, "dp4a"))
    if tt == 1 and p["dp4a"] and dp4a_wanted:
        bn = block_n or p["dp4a_block"][0]
        bw = block_k * p["pa"] // 32 if block_k else p["dp4a_block"][1]
        try:
            dp4a.launch(xs, ys, t, spec, p, group, bn, bw, num_warps or 4, method != "dp4a" and meta_sharing(spec, bn),
                        xq, even)
            return
        except Exception as e:  # a Triton/GPU that cannot build it (inline PTX): the fp32 word kernel decodes on
            if method is not None:
                raise
            CAPABILITIES.fail(xs.device, "dp4a", e)
    bn, bk, nw = block_n or p["block_n"], block_k or p["block_k"], num_warps or p["warps"]
    if p["words"] and method != "generic":
        words.launch_words(xs, ys, tt, t, spec, p, group, bn, bk, nw, tiles or p["tiles"])
        return
    if p["axis0"] and (method == "axis0" or (method is None and block_n is None and block_k is None
                                             and CAPABILITIES.works(xs.device, "axis0"))):
        try:
            words.launch_axis0(xs, ys, tt, t, spec, p, group, block_k * p["pa"] // 32 if block_k else p["axis0_block_w"],
                               num_warps or p["axis0_warps"])
            return
        except Exception as e:  # cannot build here: the element-wise kernel serves these weights instead
            if method is not None:
                raise
            CAPABILITIES.fail(xs.device, "axis0", e)
    words.launch_generic(xs, ys, tt, t, spec, p, group, bn, bk, nw)


def dequantize_fused(t: dict[str, Tensor], spec: QSpec, dtype: torch.dtype = torch.float16,
                     out: Tensor | None = None) -> Tensor:
    """The weight [N, K] in ``dtype`` (or into contiguous ``out``), dequantized by a Triton kernel."""
    return words.dequantize_fused(t, spec, plan(spec), dtype, out)


def quantize_x(x: Tensor, vw: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, K] as the dp4a kernel reads it, for words of ``vw`` weights (see ``dp4a.quantize_x``)."""
    return dp4a.quantize_x(x, vw)


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
# what the compile check builds


class CompileCase(NamedTuple):
    """One kernel variant the engine launches, as ``triton.compile`` takes it: the jit function, the
    pointer/scalar types of its run-time arguments, its constexprs, the run-time integer arguments'
    values (the launcher specializes them: == 1 becomes a constant, multiples of 16 are marked
    divisible) and the warps it launches with."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    ints: dict[str, int]
    num_warps: int


def compile_cases(block_n: int | None = None, block_k: int | None = None, warps: int | None = None,
                  tiles: int | None = None) -> list[CompileCase]:
    """Every kernel variant the engine launches for Mixtral-8x7B's shapes (plain T = 1..4, grouped
    w1+w3, grouped split-K w2; 2/3/4-bit; both axes; the Decoder's fused kernels and a streamed
    step's wait), with the block
    arguments overridden where given (``COMPILE_LIST`` is the default). Empty without Triton."""
    if not HAVE_TRITON:
        return []
    expert, attn = article_quant_config().ffn, article_quant_config().attn

    def spec_of(shape: tuple[int, int], params: dict[str, Any], **kw: Any) -> QSpec:
        return QSpec.make(shape, dict(params, **kw))

    # an expert's blob bytes (the grouped launches' slot stride) and w3's offset in it: the real
    # values, since the launcher specializes them (multiples of 16 let the kernels use 16-byte loads)
    real = ExpertFormat.make(4096, 14336, expert, torch.float16)
    blob, w3_off = real.layout.total_bytes, real.w3_offset
    out = []
    cases = [("e2", spec_of((14336, 4096), expert)), ("e2_down", spec_of((4096, 14336), expert)),
             ("e3", spec_of((14336, 4096), expert, nbits=3, group_size=64)),
             ("a4", spec_of((4096, 4096), attn)), ("a4_kv", spec_of((1024, 4096), attn)),
             ("e2_axis0", spec_of((14336, 4096), expert, axis=0)),  # the article's files: every weight axis 0
             ("e2_down_axis0", spec_of((4096, 14336), expert, axis=0)), ("a4_axis0", spec_of((4096, 4096), attn, axis=0)),
             ("a4_kv_axis0", spec_of((1024, 4096), attn, axis=0))]
    for name, spec in cases:
        p = plan(spec)
        bn, bk, nw, tl_ = block_n or p["block_n"], block_k or p["block_k"], warps or p["warps"], tiles or p["tiles"]
        s_ty = "*u8" if spec.quant_scale else "*fp16"
        z_ty = "*u8" if spec.quant_zero else "*fp16"
        ptrs = {"qa_ptr": "*u8", "qb_ptr": "*u8", "s_ptr": s_ty, "sms_ptr": "*fp16", "smz_ptr": "*fp16",
                "z_ptr": z_ty, "zms_ptr": "*fp16", "zmz_ptr": "*fp16"}
        common = dict(PA=p["pa"], PB=p["pb"], G=spec.group_size, SQ=spec.quant_scale, ZQ=spec.quant_zero)
        n, k = spec.out_features, spec.in_features
        # plain launches T = 1..4 (MPS 0), and the grouped one-token launches: w1+w3 of each expert
        # (MPS 2), w2 of each expert (MPS 1, fp32 split-K partial sums on the word kernel)
        launches = [(f"T{t}", t, 0, 1) for t in (1, 2, 3, 4)] + [("grouped13", 1, 2, 1), ("grouped2_splitk", 1, 1, 4)]
        if not p["words"]:  # no K split there: w2's grouped launch is a plain one
            launches.append(("grouped2", 1, 1, 1))
        for tag, t, mps, split in launches:
            y_ty = "*fp32" if split > 1 else "*fp16"
            sig = {"x_ptr": "*fp16", "y_ptr": y_ty, **ptrs, "slot_ptr": "*i32" if mps else "*fp16"}
            group = dict(SLOT_BYTES=blob if mps else 0, MAT_BYTES=w3_off if mps == 2 else 0,
                         X_M=k if mps == 1 else 0, Y_M=n if mps else 0)
            if p["words"]:
                wps = words.words_per_split(p["row_words_a"], split, max(1, bk * p["pa"] // 32))
                ints = dict(group, WPS=wps, Y_S=2 * n if split > 1 else 0, N=n, ROW_WA=p["row_words_a"],
                            ROW_WB=p["row_words_b"], GPR=p["groups_per_row"], S_MOD=p["s_mod"], Z_MOD=p["z_mod"],
                            stride_x=k, stride_y=n)
                cx = dict(common, T=t, R=min(tl_, 4 // t), S_MODE=p["s_mode"], Z_MODE=p["z_mode"], MPS=mps,
                          BLOCK_N=bn, BLOCK_W=max(1, bk * p["pa"] // 32))
                out.append(CompileCase(f"{name}_gemv_words_{tag}", words.gemv_words_kernel, sig, cx, ints, nw))
            if p["dp4a"] and t == 1:
                bn_d, bw_d = p["dp4a_block"]
                wps = words.words_per_split(p["row_words_a"], split, bw_d)
                sig_d = {"xh_ptr": "*i32", "xl_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "y_ptr": y_ty,
                         **{a: v for a, v in ptrs.items() if a != "qb_ptr"}, "slot_ptr": sig["slot_ptr"]}
                ints_d = dict(group, X_M=1 if mps == 1 else 0, WPS=wps, Y_S=2 * n if split > 1 else 0, N=n,
                              ROW_W=p["row_words_a"], GPR=p["groups_per_row"], S_MOD=p["s_mod"], Z_MOD=p["z_mod"])
                cx_d = dict(PA=p["pa"], G=spec.group_size, SQ=spec.quant_scale, ZQ=spec.quant_zero, S_MODE=p["s_mode"],
                            Z_MODE=p["z_mode"], MPS=mps, BLOCK_N=bn_d, BLOCK_W=bw_d, ASM=True, STRIDED=False,
                            EVEN=dp4a.whole_tiles(n, bn_d, bw_d, split, p["row_words_a"]))
                out.append(CompileCase(f"{name}_gemv_dp4a_{tag}", dp4a.gemv_dp4a_kernel, sig_d, cx_d, ints_d, warps or 4))
                if meta_sharing(spec, bn_d):
                    out.append(CompileCase(f"{name}_gemv_dp4a_shared_{tag}", dp4a.gemv_dp4a_kernel, sig_d,
                                           dict(cx_d, STRIDED=True), ints_d, warps or 4))
            if not p["words"] and split == 1:  # the axis-0 kernel, and the element-wise one it falls back to
                ints = dict(group, N=n, K=k, MS=p["ms"], MZ=p["mz"], stride_x=k, stride_y=n)
                if p["axis0"]:
                    cx0 = dict(common, T=t, MPS=mps, ROWS=p["axis0_rows"], BLOCK_W=p["axis0_block_w"],
                               S_MODE=p["axis0_s_mode"], Z_MODE=p["axis0_z_mode"])
                    out.append(CompileCase(f"{name}_gemv_axis0_{tag}", words.gemv_axis0_kernel, sig, cx0, ints,
                                           warps or p["axis0_warps"]))
                cx = dict(common, T=t, AXIS=spec.axis, MPS=mps, BLOCK_N=bn, BLOCK_K=bk)
                out.append(CompileCase(f"{name}_gemv_generic_{tag}", words.gemv_generic_kernel, sig, cx, ints, nw))
        if p["dp4a"]:
            sig_q = {"x_ptr": "*fp16", "xh_ptr": "*i32", "xl_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32"}
            out.append(CompileCase(f"{name}_quantize_x", dp4a.quantize_x_kernel, sig_q,
                                   dict(VW=32 // p["pa"], CW=dp4a.QX_WORDS), dict(ROW_W=p["row_words_a"], stride_x=k),
                                   4))
        ints = dict(N=n, K=k, MS=p["ms"], MZ=p["mz"])
        cx = dict(common, AXIS=spec.axis, BLOCK_N=words.DEQ_BLOCK[0], BLOCK_K=words.DEQ_BLOCK[1])
        out.append(CompileCase(f"{name}_dequant", words.dequant_kernel, {"w_ptr": "*fp16", **ptrs}, cx, ints, 4))
    # the Decoder's RMSNorm, rotary + cache write, router and expert sum, at Mixtral's sizes
    out.append(CompileCase("rms_norm", fused.rms_norm_kernel, {"x_ptr": "*fp16", "w_ptr": "*fp16", "y_ptr": "*fp16",
                                                          "eps": "fp32"}, dict(BLOCK=4096), dict(H=4096, stride=4096), 4))
    sig = {n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "out_ptr", "K_ptr", "V_ptr")}
    out.append(CompileCase("rope_cache", fused.rope_cache_kernel, dict(sig, pos_ptr="*i64"), dict(HD=128),
                           dict(T=1, NH=32, MAX_LEN=4096, stride_q=4096, stride_k=1024, stride_v=1024, stride_c=128),
                           1))
    out.append(CompileCase("route_topk", fused.route_topk_kernel, {"x_ptr": "*fp16", "w_ptr": "*fp16", "wout_ptr": "*fp32",
                                                             "iout_ptr": "*i64"},
                           dict(HAS_W=True, K=2, KP=2, BE=8, BH=256), dict(H=4096, E=8, stride_x=4096), 4))
    out.append(CompileCase("weighted_sum", fused.weighted_sum_kernel, {"y_ptr": "*fp32", "w_ptr": "*fp32", "c_ptr": "*i32",
                                                                 "out_ptr": "*fp16"},
                           dict(HAS_COLS=True, BLOCK=1024), dict(S=4, N=2, H=4096), 4))
    out.append(CompileCase("wait_slots", fused.wait_slots_kernel, {"ids_ptr": "*i64", "row_ptr": "*i32",
                                                             "flags_ptr": "*i32", "out_ptr": "*i32"},
                           dict(K=2, KP=2), dict(max_spins=fused.WAIT_SPINS), 1))
    return out
