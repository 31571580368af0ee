"""Low-bit weights: HQQ-optimised codes plus our own 8-bit quantization of scales and zeros.

hqq 0.2.8 still finds good codes, scales and zeros (its half-quadratic solver), but it stopped
quantizing the scales and zeros themselves, which makes 2-bit group-16 weights cost 4 bits/param.
Here the scales and zeros are stored in 8 bits (meta-quantization, like hqq 0.1.1 did), so a 2-bit
g16 Mixtral expert is ~3.02 bits/param (66.4 MB) and 4-bit g64 attention ~4.25 bits/param.

The format, for a linear weight ``W`` of shape [N, K] (out, in), b bits, group size g, M = N*K/g:

- codes ``q[f]`` in [0, 2^b) for the flat index f = n*K + k;
- group of f: ``c = f // g`` (axis 1: g neighbours along K; our default) or ``c = f mod M``
  (axis 0: hqq 0.1.1's layout, a column's rows n0, n0 + N/g, ...; kept to read the article's files);
- ``W[f] = (q[f] - z[c]) * s[c]``: s is a step size (multiply), z a real-valued zero point;
- 8-bit meta: ``s[c] = (s_q[c] - s_mz[c mod Ms]) * s_ms[c mod Ms]`` with Ms = M / scale_group, i.e.
  meta groups of ``scale_group`` values strided by Ms (hqq 0.1.1's convention); zeros likewise with
  Mz = M / zero_group (zero_group None: Mz = 1, one scale/zero for the whole tensor);
- codes are stored as bit planes packed along K: b = 2 -> one 2-bit plane, 3 -> a 2-bit plane (low
  bits) plus a 1-bit plane (high bit), 4 -> one 4-bit plane; in a plane of p bits, byte ``[n, j]``
  holds k = j*(8/p) + i in bits p*i .. p*i + p - 1 (neighbouring k, least significant first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .storage import Layout

PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


@dataclass(frozen=True)
class QSpec:
    """Everything needed to read one quantized weight: its shape and its quantization settings."""

    out_features: int
    in_features: int
    nbits: int
    group_size: int
    axis: int = 1
    quant_scale: bool = True
    scale_group: int = 128
    quant_zero: bool = True
    zero_group: int | None = None

    @classmethod
    def make(cls, shape: tuple[int, int], params: dict[str, Any]) -> "QSpec":
        """Resolve a QuantConfig's settings for a weight of ``shape`` (meta groups must divide M)."""
        n, k = shape
        g = params["group_size"]
        if (n * k) % g:
            raise ValueError(f"group_size={g} does not divide a weight of shape {tuple(shape)}")
        m = n * k // g
        for p in PLANES[params["nbits"]]:
            if k % (8 // p):
                raise ValueError(f"in_features={k} must be a multiple of {8 // p} for {params['nbits']}-bit packing")
        if params["axis"] == 1 and k % g:
            raise ValueError(f"group_size={g} must divide in_features={k} for axis=1 grouping")
        if params["axis"] == 0 and n % g:
            raise ValueError(f"group_size={g} must divide out_features={n} for axis=0 grouping")
        sg = math.gcd(m, params["scale_group"] or m)
        zg = math.gcd(m, params["zero_group"] or m)
        return cls(n, k, params["nbits"], g, params["axis"], params["quant_scale"], sg, params["quant_zero"], zg)

    @property
    def groups(self) -> int:
        return self.out_features * self.in_features // self.group_size

    def layout(self, prefix: str = "") -> Layout:
        """Byte layout of this weight's tensors (codes, scales, zeros and their meta)."""
        n, k, m = self.out_features, self.in_features, self.groups
        segs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for p in PLANES[self.nbits]:
            segs.append((f"{prefix}q{p}", torch.uint8, (n, k * p // 8)))
        for what, quant, group in (("scale", self.quant_scale, self.scale_group), ("zero", self.quant_zero, self.zero_group)):
            if quant:
                mm = m // group
                segs += [(f"{prefix}{what}_q", torch.uint8, (m,)), (f"{prefix}{what}_ms", torch.float16, (mm,)),
                         (f"{prefix}{what}_mz", torch.float16, (mm,))]
            else:
                segs.append((f"{prefix}{what}", torch.float16, (m,)))
        return Layout.of(segs)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# bit planes


def pack_planes(q: Tensor, nbits: int) -> dict[str, Tensor]:
    """Codes [N, K] (integers < 2^nbits) -> bit planes packed along K (see module docstring)."""
    q = q.to(torch.int32)
    out: dict[str, Tensor] = {}
    shift = 0
    for p in PLANES[nbits]:
        v = (q >> shift) & ((1 << p) - 1)
        vpb = 8 // p
        v = v.view(q.shape[0], -1, vpb)
        packed = torch.zeros(v.shape[:2], dtype=torch.int32, device=q.device)
        for i in range(vpb):
            packed |= v[:, :, i] << (p * i)
        out[f"q{p}"] = packed.to(torch.uint8)
        shift += p
    return out


def unpack_planes(planes: dict[str, Tensor], nbits: int) -> Tensor:
    """Inverse of :func:`pack_planes`: bit planes -> codes [N, K] as uint8."""
    q = None
    shift = 0
    for p in PLANES[nbits]:
        packed = planes[f"q{p}"]
        vpb = 8 // p
        mask = (1 << p) - 1
        shifts = torch.arange(0, 8, p, device=packed.device, dtype=torch.uint8)
        v = (packed.unsqueeze(-1) >> shifts) & mask
        v = v.reshape(packed.shape[0], packed.shape[1] * vpb) << shift
        q = v if q is None else q | v
        shift += p
    assert q is not None
    return q


# ---------------------------------------------------------------------------------------------
# meta quantization (8-bit scales and zeros)


def meta_quantize(v: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """8-bit quantize a flat vector in groups of ``group`` values strided by len(v)/group."""
    mm = v.numel() // group
    g = v.float().view(group, mm)
    lo, hi = g.min(dim=0).values, g.max(dim=0).values
    ms = ((hi - lo) / 255.0).clamp(min=1e-8).half()
    mz = (-lo / ms.float()).half()
    vq = torch.round(g / ms.float() + mz.float()).clamp_(0, 255).to(torch.uint8)
    return vq.view(-1), ms, mz


def meta_dequantize(vq: Tensor, ms: Tensor, mz: Tensor) -> Tensor:
    """Inverse of :func:`meta_quantize`, in float32."""
    mm = ms.numel()
    return ((vq.view(-1, mm).float() - mz.float()) * ms.float()).view(-1)


def scales_zeros(t: dict[str, Tensor], spec: QSpec) -> tuple[Tensor, Tensor]:
    """Per-group step sizes and zero points (float32, length M) from stored tensors."""
    s = meta_dequantize(t["scale_q"], t["scale_ms"], t["scale_mz"]) if spec.quant_scale else t["scale"].float()
    z = meta_dequantize(t["zero_q"], t["zero_ms"], t["zero_mz"]) if spec.quant_zero else t["zero"].float()
    return s, z


_LUTS: dict[tuple[int, int, str], Tensor] = {}


def _codes_float(t: dict[str, Tensor], nbits: int) -> Tensor:
    """Codes [N, K] as float32 via a byte -> values lookup table (one gather per plane).

    Several times faster on CPU than shifting uint8 tensors, and exact: codes are small integers.
    """
    q = None
    shift = 0
    for p in PLANES[nbits]:
        packed = t[f"q{p}"]
        key = (p, shift, str(packed.device))
        lut = _LUTS.get(key)
        if lut is None:
            b = torch.arange(256)
            lut = torch.stack([((b >> (p * i)) & ((1 << p) - 1)) << shift for i in range(8 // p)], -1).float()
            lut = _LUTS[key] = lut.to(packed.device)
        v = F.embedding(packed.long(), lut).view(packed.shape[0], -1)
        q = v if q is None else q.add_(v)
        shift += p
    assert q is not None
    return q


def dequantize(t: dict[str, Tensor], spec: QSpec, dtype: torch.dtype = torch.float32) -> Tensor:
    """Stored tensors -> the floating-point weight [N, K] (the pure-torch reference path)."""
    q = _codes_float(t, spec.nbits)
    s, z = scales_zeros(t, spec)
    m, g = spec.groups, spec.group_size
    if spec.axis == 1:
        w = (q.view(m, g) - z[:, None]) * s[:, None]
    else:
        w = (q.view(g, m) - z[None, :]) * s[None, :]
    return w.view(spec.out_features, spec.in_features).to(dtype)


# ---------------------------------------------------------------------------------------------
# quantization


def quantize(w: Tensor, spec: QSpec) -> dict[str, Tensor]:
    """Quantize a weight [N, K]: hqq's solver for codes/scales/zeros, then 8-bit meta, then re-round.

    The codes are recomputed against the meta-quantized scales and zeros, so they are optimal for
    the values the kernels will actually use.
    """
    from hqq.core.quantize import Quantizer  # imported lazily: hqq prints warnings on import

    n, k = w.shape
    assert (n, k) == (spec.out_features, spec.in_features)
    dev = w.device
    wf = w.float()
    _, meta = Quantizer.quantize(
        wf, nbits=spec.nbits, channel_wise=True, group_size=spec.group_size, optimize=True,
        round_zero=False, axis=spec.axis, bitpack=False, device=str(dev),
    )
    s = meta["scale"].float().reshape(-1).to(dev)
    z = meta["zero"].float().reshape(-1).to(dev)
    out: dict[str, Tensor] = {}
    if spec.quant_scale:
        out["scale_q"], out["scale_ms"], out["scale_mz"] = meta_quantize(s, spec.scale_group)
    else:
        out["scale"] = s.half()
    if spec.quant_zero:
        out["zero_q"], out["zero_ms"], out["zero_mz"] = meta_quantize(z, spec.zero_group or spec.groups)
    else:
        out["zero"] = z.half()
    s2, z2 = scales_zeros(out, spec)
    inv = torch.where(s2.abs() > 1e-12, 1.0 / s2, torch.zeros_like(s2))
    m, g = spec.groups, spec.group_size
    if spec.axis == 1:
        q = wf.view(m, g) * inv[:, None] + z2[:, None]
    else:
        q = wf.view(g, m) * inv[None, :] + z2[None, :]
    q = torch.round(q).clamp_(0, (1 << spec.nbits) - 1).to(torch.uint8).view(n, k)
    out.update(pack_planes(q, spec.nbits))
    return {name: out[name] for name in spec.layout().names}


def nbytes(spec: QSpec) -> int:
    """Bytes one quantized weight takes (codes + meta), computed without allocating it."""
    return spec.layout().raw_bytes
