"""Fused Triton kernels vs the pure-torch reference, on random weights in our quantized format.

The kernels run under ``TRITON_INTERPRET=1`` on the CPU (in a child pytest started with the
variable set, since Triton picks the interpreter when it is first imported) and natively on CUDA
when a GPU is present. Outputs are poisoned with NaN before every run, so an unwritten element fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral_nb import kernels
from mixtral_nb.kernels import CAPABILITIES, dp4a, fused, words
from mixtral_nb.quant import QSpec, dequantize

HAVE_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]

# (out, in, group) per axis; N not a multiple of BLOCK_N and K not a multiple of BLOCK_K somewhere
SHAPES = {1: [(40, 256, 16), (24, 320, 64), (20, 640, 16)], 0: [(40, 256, 8), (64, 320, 64)]}
CASES = [(b, axis, shape) for b in (2, 3, 4) for axis in (1, 0) for shape in SHAPES[axis]]


def make_spec(shape: tuple[int, int], nbits: int, group: int, axis: int, **kw) -> QSpec:
    params = dict(nbits=nbits, group_size=group, axis=axis, quant_scale=True, scale_group=128, quant_zero=True,
                  zero_group=None)
    params.update(kw)
    return QSpec.make(shape, params)


def random_tensors(spec: QSpec, gen: torch.Generator, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random codes and random (positive, varied) meta values: any valid stored weight."""
    t = {}
    for s in spec.layout().segments:
        if s.dtype == torch.uint8:
            t[s.name] = torch.randint(0, 256, s.shape, dtype=torch.uint8, generator=gen)
        elif s.name.endswith("_mz"):
            t[s.name] = (torch.rand(s.shape, generator=gen) * 60 - 30).half()
        else:
            t[s.name] = (torch.rand(s.shape, generator=gen) * 0.02 + 0.005).half()
    return {k: v.to(device) for k, v in t.items()}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "output has unwritten (NaN-poisoned) or NaN elements"
    return ((y.double() - ref).norm() / ref.norm()).item()


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# runs only under TRITON_INTERPRET=1: test_kernels_under_interpreter starts that pytest run (conftest.py
# deselects these tests elsewhere)
needs_interpreter = pytest.mark.interpreter


@pytest.fixture
def interp():
    """The kernels package, whose Triton functions run in the interpreter in this process."""
    assert isinstance(words.gemv_words_kernel, triton_interpreted_type())
    return kernels


@pytest.fixture
def fresh_capabilities():
    """A test that breaks a kernel on purpose leaves no recorded failure behind."""
    CAPABILITIES.reset()
    yield CAPABILITIES
    CAPABILITIES.reset()


def triton_interpreted_type():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter run itself")
@pytest.mark.timeout(300)
def test_kernels_under_interpreter():
    """Triton picks the interpreter when it is imported, so the kernel tests run in a child pytest."""
    assert HAVE_TRITON, "triton is not installed: `pip install triton` (requirements-dev.txt) runs the kernels on CPU"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "interpreted"], env=env, capture_output=True, text=True, cwd=ROOT)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], tail


@pytest.mark.skipif(INTERPRETING, reason="compiles natively; not part of the interpreter run")
@pytest.mark.timeout(300)
def test_every_kernel_variant_compiles_for_a_t4(tmp_path):
    """Every variant the engine launches (plain, grouped, split-K; 2/3/4-bit; both axes) compiles to
    sm_75 machine code with Triton's bundled ptxas, with no bf16 or tensor-core instructions: a T4
    can run it. No GPU is needed to compile."""
    assert HAVE_TRITON, "triton is not installed: `pip install triton` (requirements-dev.txt)"
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "scripts/kernel_bench.py", "compile", "--arch", "75"], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("compile sm_75")]
    assert proc.returncode == 0 and len(lines) >= 40, (proc.stdout + proc.stderr)[-4000:]
    assert all(": OK" in ln and "SUSPECT" not in ln for ln in lines), "\n".join(ln for ln in lines if ": OK" not in ln
                                                                             or "SUSPECT" in ln)
    assert any("grouped2_splitk" in ln for ln in lines) and any("gemv_generic" in ln for ln in lines)
    assert any("gemv_axis0_grouped13" in ln for ln in lines)
    assert any("gemv_dp4a" in ln for ln in lines) and any("quantize_x" in ln for ln in lines)
    assert any("wait_slots" in ln for ln in lines)


# ---------------------------------------------------------------------------------------------
# the fallback (always runs)


@pytest.mark.parametrize("nbits,axis,shape", CASES)
def test_fallback_matches_dequantize(nbits, axis, shape):
    gen = torch.Generator().manual_seed(1)
    spec = make_spec(shape[:2], nbits, shape[2], axis)
    t = random_tensors(spec, gen)
    w = dequantize(t, spec).double()
    x = torch.randn(3, 2, spec.in_features, generator=gen)
    y = kernels.qlinear(x, t, spec)  # CPU tensors: the pure-torch path
    assert y.shape == (3, 2, spec.out_features)
    assert rel_err(y, x.double() @ w.T) < 1e-5
    y16 = kernels.qlinear_reference(x.half(), t, spec)
    assert y16.dtype == torch.float16


def test_available_reports():
    info = kernels.available()
    assert set(info) >= {"triton", "cuda", "fused", "failed"}
    assert info["fused"] == (kernels.HAVE_TRITON and torch.cuda.is_available())


def test_kernel_policy_by_shape():
    """The kernel of every Mixtral weight follows from its shape and format alone: 2-bit experts take
    dp4a on meta-sharing tiles (w2 unsplit), 4-bit attention dp4a on consecutive rows, 3-bit the word
    kernel (w2 split 4), axis-0 weights (the article's) the axis-0 kernel, odd axis-0 groups the
    element-wise one."""
    e2 = dict(nbits=2, group_size=16, axis=1, quant_scale=True, scale_group=128, quant_zero=True, zero_group=None)
    a4 = dict(e2, nbits=4, group_size=64, scale_group=256)
    e3 = dict(e2, nbits=3, group_size=64)
    w1, w2 = QSpec.make((14336, 4096), e2), QSpec.make((4096, 14336), e2)
    for spec in (w1, w2):
        p = kernels.plan(spec)
        assert p["dp4a"] and p["strided"] and kernels.dispatch.meta_sharing(spec, p["dp4a_block"][0])
    assert kernels.grouped_split(w2) == 1 and kernels.grouped_split(w1) == 1
    q = kernels.plan(QSpec.make((4096, 4096), a4))
    assert q["dp4a"] and not q["strided"] and q["dp4a_block"] == (4, 128)
    assert not kernels.plan(QSpec.make((14336, 4096), e3))["dp4a"] and kernels.plan(QSpec.make((14336, 4096), e3))["words"]
    assert kernels.grouped_split(QSpec.make((4096, 14336), e3)) == 4
    axis0 = kernels.plan(QSpec.make((14336, 4096), dict(e2, axis=0)))
    # the scale meta (g128 over 14336 * 4096 / 16 groups) steps with one wrap; the zero's one entry is loaded once
    assert not axis0["words"] and axis0["axis0"] and (axis0["axis0_s_mode"], axis0["axis0_z_mode"]) == (1, 0)
    q0 = kernels.plan(QSpec.make((4096, 4096), dict(a4, axis=0)))  # G = 64 over 4 programs of 16 rows
    assert q0["axis0_rows"] == 16 and axis0["axis0_rows"] == 16
    assert not kernels.plan(QSpec.make((48, 256), dict(e2, axis=0, group_size=12)))["axis0"]
    assert not kernels.plan(QSpec.make((64, 320), dict(e3, axis=0, group_size=16)))["axis0"]  # two bit planes
    assert not kernels.plan(w1)["axis0"]


def test_unknown_method_is_refused():
    spec = make_spec((40, 256), 2, 16, 1)
    t = random_tensors(spec, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="unknown GEMV method 'dp4a_ahead'.*dp4a_shared, dp4a, words"):
        kernels.qgemv(torch.zeros(1, 256), t, spec, method="dp4a_ahead")


def test_compile_list_names_every_launched_variant_once():
    names = [c.name for c in kernels.COMPILE_LIST]
    assert len(names) == len(set(names)) and len(names) >= 40
    assert {"e2_gemv_dp4a_shared_grouped13", "e2_down_gemv_dp4a_shared_grouped2_splitk", "a4_gemv_dp4a_T1",
            "e3_gemv_words_T1", "e2_axis0_gemv_generic_T1", "e2_dequant", "rms_norm"} <= set(names)
    assert not any("a4_gemv_dp4a_shared" in n for n in names)  # 4-bit tiles keep consecutive rows


# ---------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (CPU)


@needs_interpreter
@pytest.mark.parametrize("nbits,axis,shape", CASES)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_gemv_interpreted(interp, nbits, axis, shape, rows):
    gen = torch.Generator().manual_seed(nbits * 100 + axis * 10 + rows)
    spec = make_spec(shape[:2], nbits, shape[2], axis)
    t = random_tensors(spec, gen)
    w = dequantize(t, spec).double()
    x = torch.randn(rows, spec.in_features, generator=gen).half()
    out = torch.full((rows, spec.out_features), float("nan"), dtype=torch.float16)
    y = interp.qgemv(x, t, spec, out=out)
    assert rel_err(y, x.double() @ w.T) < 2e-3  # fp16 output rounding ~2e-4


@needs_interpreter
@pytest.mark.parametrize("nbits,axis,shape", CASES[::2])
def test_dequantize_interpreted(interp, nbits, axis, shape):
    gen = torch.Generator().manual_seed(7)
    spec = make_spec(shape[:2], nbits, shape[2], axis)
    t = random_tensors(spec, gen)
    out = torch.full((spec.out_features, spec.in_features), float("nan"), dtype=torch.float16)
    w = interp.dequantize_fused(t, spec, torch.float16, out=out)
    assert rel_err(w, dequantize(t, spec).double()) < 1e-3


@needs_interpreter
@pytest.mark.parametrize("kw", [dict(quant_scale=False), dict(quant_zero=False), dict(zero_group=64),
                                dict(scale_group=32, zero_group=16)])
@pytest.mark.parametrize("axis", [1, 0])
def test_meta_variants_interpreted(interp, kw, axis):
    gen = torch.Generator().manual_seed(3)
    spec = make_spec((48, 256), 2, 16, axis, **kw)
    t = random_tensors(spec, gen)
    w = dequantize(t, spec).double()
    x = torch.randn(2, spec.in_features, generator=gen).half()
    out = torch.full((2, spec.out_features), float("nan"), dtype=torch.float16)
    assert rel_err(interp.qgemv(x, t, spec, out=out), x.double() @ w.T) < 2e-3


@needs_interpreter
def test_block_overrides_interpreted(interp):
    """Other block shapes (the micro-benchmark sweeps them) compute the same thing."""
    gen = torch.Generator().manual_seed(5)
    spec = make_spec((56, 256), 2, 16, 1)
    t = random_tensors(spec, gen)
    ref = torch.randn(1, 256, generator=gen).half()
    w = dequantize(t, spec).double()
    for bn, bk, tiles in ((4, 64, 1), (32, 128, 2), (8, 1024, 4), (16, 16, 4)):
        out = torch.full((1, 56), float("nan"), dtype=torch.float16)
        y = interp.qgemv(ref, t, spec, out=out, block_n=bn, block_k=bk, num_warps=2, tiles=tiles)
        assert rel_err(y, ref.double() @ w.T) < 2e-3, (bn, bk, tiles)


@needs_interpreter
@pytest.mark.parametrize("vw", [16, 8])
def test_quantize_x_interpreted(interp, vw):
    """The dp4a kernel's activations: bytes in the order its masks pick codes, ~15 bits of each value."""
    gen = torch.Generator().manual_seed(vw)
    k = 64 * vw + 3 * 32  # a partial last program
    x = torch.randn(2, k, generator=gen).half()
    x[0, 7] = 300.0  # an outlier costs precision only within its 32 values
    x[1, 40:72] = 0.0  # an all-zero block
    xh, xl, xd, xs = interp.quantize_x(x, vw)
    words = k // vw

    def unpack(p):  # [T, vw/4, words] int32 -> [T, K] signed bytes at the weights they multiply
        b = torch.stack([(p >> (8 * i)) & 0xFF for i in range(4)], -1)  # [T, J, W, 4]: byte b of int j
        b = torch.where(b > 127, b - 256, b).permute(0, 2, 3, 1)  # [T, W, 4 (b), J]: k = w*vw + b*J + j
        return b.reshape(2, k).double()

    d = xd.double().repeat_interleave(vw, 1)
    rebuilt = d * (256 * unpack(xh) + unpack(xl))
    block_max = x.double().abs().view(2, -1, 32).amax(-1).repeat_interleave(32, 1)
    assert ((rebuilt - x.double()).abs() <= block_max / (127 * 256)).all()  # 1/512 of a step, 1/256 when l clamps
    assert torch.allclose(xs.double(), x.double().view(2, words, vw).sum(-1), rtol=1e-6, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("nbits,group", [(2, 16), (4, 64), (4, 32)])
def test_dp4a_matches_words_interpreted(interp, nbits, group):
    """Both one-token kernels agree with the reference, also on activations with outlier channels."""
    gen = torch.Generator().manual_seed(nbits * group)
    spec = make_spec((72, 512), nbits, group, 1)
    assert kernels.plan(spec)["dp4a"]
    t = random_tensors(spec, gen)
    w = dequantize(t, spec).double()
    x = torch.randn(1, 512, generator=gen).half()
    x[0, ::97] *= 60
    for method in ("dp4a", "dp4a_shared", "words"):
        for bn, bk in ((None, None), (4, 8 * 32 // nbits)):  # default blocks; 8 words a step: 4+ steps a row
            out = torch.full((1, 72), float("nan"), dtype=torch.float16)
            y = interp.qgemv(x, t, spec, out=out, method=method, block_n=bn, block_k=bk)
            assert rel_err(y, x.double() @ w.T) < 1e-3, (method, bn)


@needs_interpreter
@pytest.mark.parametrize("block_n", [None, 8])
def test_dp4a_strided_rows_interpreted(interp, block_n):
    """Tiles of 2-bit rows that share their scale meta (method "dp4a_shared") give the same products as
    tiles of consecutive rows; 4-bit weights keep consecutive rows."""
    gen = torch.Generator().manual_seed(3)
    shape = (256, 256)
    spec = make_spec(shape, 2, 16, 1, scale_group=32)
    p = kernels.plan(spec)
    assert p["strided"] and p["s_mod"] > 1
    assert not kernels.plan(make_spec((128, 512), 4, 64, 1, scale_group=32))["strided"]
    t = random_tensors(spec, gen)
    w = dequantize(t, spec).double()
    x = torch.randn(1, shape[1], generator=gen).half()
    ys = {m: interp.qgemv(x, t, spec, method=m, block_n=block_n) for m in ("dp4a", "dp4a_shared")}
    for m, y in ys.items():
        assert rel_err(y, x.double() @ w.T) < 1e-3, m
    assert torch.equal(ys["dp4a"], ys["dp4a_shared"])  # same sums in the same order, other programs


@needs_interpreter
@pytest.mark.parametrize("nbits,shape,group,block_k", [(2, (256, 256), 16, 256), (4, (64, 512), 64, 512)])
def test_dp4a_whole_tiles_interpreted(interp, nbits, shape, group, block_k):
    """Unmasked loads where every tile is whole give the very sums of the masked kernel, every method."""
    gen = torch.Generator().manual_seed(5)
    spec = make_spec(shape, nbits, group, 1, scale_group=32)
    p = interp.plan(spec)
    bw = block_k * p["pa"] // 32
    assert dp4a.whole_tiles(shape[0], p["dp4a_block"][0], bw, 1, p["row_words_a"])
    t = random_tensors(spec, gen)
    x = torch.randn(1, shape[1], generator=gen).half()
    for method in ("dp4a", "dp4a_shared"):
        y = interp.qgemv(x, t, spec, method=method, block_k=block_k)
        assert torch.equal(y, interp.qgemv(x, t, spec, method=method, block_k=block_k, even=False)), method


def test_whole_tiles_rule():
    """Mixtral's w1/w3 and unsplit w2 take unmasked tiles; w2 split 4 (896 words: 256, 256, 256, 128) does not."""
    assert dp4a.whole_tiles(14336, 8, 64, 1, 256)
    assert dp4a.whole_tiles(4096, 8, 64, 1, 896)
    assert not dp4a.whole_tiles(4096, 8, 64, 4, 896)
    assert not dp4a.whole_tiles(100, 8, 64, 1, 256)
    assert not dp4a.whole_tiles(4096, 4, 64, 1, 96)


@needs_interpreter
def test_shared_quantized_x_interpreted(interp):
    """q, k and v of one layer share one quantize_x of their input: same outputs as each quantizing it."""
    gen = torch.Generator().manual_seed(9)
    specs = [make_spec(shape, 4, 64, 1) for shape in ((64, 256), (32, 256))]
    x = torch.randn(1, 256, generator=gen).half()
    xq = interp.quantize_x(x, 8)
    for spec in specs:
        t = random_tensors(spec, gen)
        assert torch.equal(interp.qgemv(x, t, spec, xq=xq, method="dp4a"), interp.qgemv(x, t, spec, method="dp4a"))
    assert interp.shared_x(x, specs) is None  # CPU tensors: the fused path is the GPU's


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu  # on the GPU machine: `make test-gpu` (conftest.py deselects it without CUDA)
@pytest.mark.parametrize("nbits,axis,shape", CASES + [(2, 1, (14336, 4096, 16)), (2, 1, (4096, 14336, 16)),
                                                      (4, 1, (1024, 4096, 64)), (2, 0, (4096, 14336, 16)),
                                                      (4, 0, (1024, 4096, 64))])
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 33])
def test_qlinear_cuda(nbits, axis, shape, rows):
    gen = torch.Generator().manual_seed(11 + rows)
    spec = make_spec(shape[:2], nbits, shape[2], axis, scale_group=128 if shape[2] == 16 else 256)
    t = random_tensors(spec, gen, "cuda")
    w = dequantize({k: v.cpu() for k, v in t.items()}, spec).double()
    x = torch.randn(rows, spec.in_features, generator=gen).half()
    ref = x.double() @ w.T
    y = kernels.qlinear(x.cuda(), t, spec)
    assert rel_err(y.cpu(), ref) < 2e-3
    if rows <= kernels.GEMV_MAX_T:
        out = torch.full((rows, spec.out_features), float("nan"), dtype=torch.float16, device="cuda")
        assert rel_err(kernels.qgemv(x.cuda(), t, spec, out=out).cpu(), ref) < 2e-3
    wd = torch.full((spec.out_features, spec.in_features), float("nan"), dtype=torch.float16, device="cuda")
    assert rel_err(kernels.dequantize_fused(t, spec, out=wd).cpu(), w) < 1e-3



# ---------------------------------------------------------------------------------------------
# grouped launches: several experts' matrices at slot offsets of one buffer (the expert cache)


def expert_buffer(nbits: int, group: int, axis: int, slots: int, gen: torch.Generator, device: str = "cpu",
                  hidden: int = 128, intermediate: int = 192):
    """A buffer of ``slots`` random expert blobs, its ExpertFormat, and the w3 - w1 byte distance."""
    from mixtral_nb.expert import ExpertFormat

    params = dict(nbits=nbits, group_size=group, axis=axis, quant_scale=True, scale_group=128, quant_zero=True,
                  zero_group=None)
    fmt = ExpertFormat.make(hidden, intermediate, params, torch.float16)
    buf = torch.stack([fmt.layout.pack({f"{n}.{k}": v for n, spec in zip(("w1", "w3", "w2"), fmt.specs)
                                        for k, v in random_tensors(spec, gen).items()}) for _ in range(slots)])
    views = fmt.views(buf[0])
    return buf.to(device), fmt, views


@needs_interpreter
@pytest.mark.parametrize("nbits,shape,block_k,kw,modes", [
    (2, (40, 256, 8), None, {}, (2, 0)), (4, (64, 320, 64), None, {}, (2, 0)), (2, (96, 208, 16), 64, {}, (1, 0)),
    (4, (128, 200, 32), 64, {}, (1, 0)), (2, (64, 512, 16), 128, {}, (1, 0)), (4, (64, 256, 8), 64, {}, (1, 0)),
    (2, (32, 512, 16), 64, dict(zero_group=64), (2, 1)), (4, (32, 128, 16), None, dict(quant_scale=False), (0, 0))])
def test_axis0_kernel_interpreted(interp, fresh_capabilities, nbits, shape, block_k, kw, modes):
    """The article's axis-0 weights take the axis-0 kernel itself (no failure, so no fallback to the
    element-wise kernel), for every row count, every way of finding the meta entries (``modes``: scale's,
    zero's) and a K that is no multiple of its block (``block_k`` weights per step: the last one short)."""
    gen = torch.Generator().manual_seed(nbits + shape[0])
    spec = make_spec(shape[:2], nbits, shape[2], 0, **kw)
    p = interp.plan(spec)
    assert p["axis0"] and (p["axis0_s_mode"], p["axis0_z_mode"]) == modes
    t = random_tensors(spec, gen)
    w = dequantize(t, spec).double()
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, spec.in_features, generator=gen).half()
        out = torch.full((rows, spec.out_features), float("nan"), dtype=torch.float16)
        assert rel_err(interp.qgemv(x, t, spec, out=out), x.double() @ w.T) < 2e-3, rows
        y_old = interp.qgemv(x, t, spec, method="generic")  # the element-wise kernel, named
        assert rel_err(y_old, x.double() @ w.T) < 2e-3 and torch.equal(interp.qgemv(x, t, spec, method="axis0"), out)
        if block_k:
            y = interp.qgemv(x, t, spec, method="axis0", block_k=block_k)
            assert rel_err(y, x.double() @ w.T) < 2e-3, (rows, block_k)
    assert fresh_capabilities.failures() == {}
    with pytest.raises(ValueError, match="axis-0 kernel takes axis-0 weights"):
        interp.qgemv(x, random_tensors(make_spec((40, 256), 2, 16, 1), gen), make_spec((40, 256), 2, 16, 1),
                     method="axis0")


@needs_interpreter
@pytest.mark.parametrize("nbits,group,axis", [(2, 16, 1), (3, 32, 1), (4, 64, 1), (2, 16, 0)])
def test_grouped_interpreted(interp, nbits, group, axis):
    gen = torch.Generator().manual_seed(nbits + group)
    buf, fmt, _ = expert_buffer(nbits, group, axis, 4, gen)
    views = fmt.views(buf[0])
    s1, _, s2 = fmt.specs
    slots = torch.tensor([3, 1], dtype=torch.int32)
    x = torch.randn(1, 128, generator=gen).half()
    out = torch.full((4, 192), float("nan"), dtype=torch.float16)
    CAPABILITIES.reset()
    y = interp.qgemv_grouped(x, views[0], s1, slots, buf.stride(0), 2, fmt.w3_offset, out=out)
    for m in range(4):
        w = fmt.dense(buf[slots[m // 2]])[m % 2].double()
        assert rel_err(y[m], x[0].double() @ w.T) < 2e-3, m
    h = torch.randn(2, 192, generator=gen).half()
    out2 = torch.full((2, 128), float("nan"), dtype=torch.float16)
    y2 = interp.qgemv_grouped(h, views[2], s2, slots, buf.stride(0), out=out2)
    for m in range(2):
        w = fmt.dense(buf[slots[m]])[2].double()
        assert rel_err(y2[m], h[m].double() @ w.T) < 2e-3, m
    assert CAPABILITIES.failures() == {}  # axis 0 ran its own kernel, no fallback


@needs_interpreter
@pytest.mark.parametrize("nbits", [2, 3])
def test_grouped_split_k_interpreted(interp, nbits):
    """w2-shaped (short, wide) matrices with K split over programs: fp32 partial sums add up."""
    gen = torch.Generator().manual_seed(20 + nbits)
    buf, fmt, _ = expert_buffer(nbits, 16 if nbits == 2 else 32, 1, 3, gen, hidden=32, intermediate=4096)
    s2 = fmt.specs[2]
    slots = torch.tensor([2, 0], dtype=torch.int32)
    h = torch.randn(2, 4096, generator=gen).half()
    for split, method in ((2, None), (3, None), (5, None), (3, "words")):  # 5: programs with no words
        out = torch.full((split, 2, 32), float("nan"), dtype=torch.float32)
        kw = {"method": method} if method and nbits == 2 else {}
        y = interp.qgemv_grouped(h, fmt.views(buf[0])[2], s2, slots, buf.stride(0), out=out, split=split, **kw)
        for m in range(2):
            w = fmt.dense(buf[slots[m]])[2].double()
            assert rel_err(y.sum(0)[m], h[m].double() @ w.T) < 1e-4, (split, m)


@pytest.mark.gpu
@pytest.mark.parametrize("nbits,group,axis", [(2, 16, 1), (3, 32, 1), (4, 64, 1), (2, 16, 0)])
def test_grouped_cuda(nbits, group, axis):
    gen = torch.Generator().manual_seed(nbits)
    buf, fmt, _ = expert_buffer(nbits, group, axis, 5, gen, "cuda")
    views = fmt.views(buf[0])
    s1, _, s2 = fmt.specs
    slots = torch.tensor([4, 2], dtype=torch.int32, device="cuda")
    x = torch.randn(1, 128, generator=gen).half().cuda()
    y = kernels.qgemv_grouped(x, views[0], s1, slots, buf.stride(0), 2, fmt.w3_offset)
    h = torch.randn(2, 192, generator=gen).half().cuda()
    y2 = kernels.qgemv_grouped(h, views[2], s2, slots, buf.stride(0))
    for m in range(4):
        w = fmt.dense(buf[int(slots[m // 2])].cpu())[m % 2].double()
        assert rel_err(y[m].cpu(), x[0].cpu().double() @ w.T) < 2e-3
    for m in range(2):
        w = fmt.dense(buf[int(slots[m])].cpu())[2].double()
        assert rel_err(y2[m].cpu(), h[m].cpu().double() @ w.T) < 2e-3


# ---------------------------------------------------------------------------------------------
# the Decoder's small fused kernels (fused.py) against their PyTorch spelling


def _fused_cases(device: str):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 320, generator=gen) * 3).half().to(device)
    w = (torch.rand(320, generator=gen) + 0.5).half().to(device)
    T, nh, nkv, hd, max_len = 2, 4, 2, 16, 12
    q, k, v = (torch.randn(T, n * hd, generator=gen).half().to(device) for n in (nh, nkv, nkv))
    ang = torch.rand(T, hd // 2, generator=gen) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).half().to(device)
    sin = torch.cat([-ang.sin(), ang.sin()], -1).half().to(device)
    pos = torch.tensor([5, 9], device=device)
    return x, w, (q, k, v, cos, sin, pos, nkv, max_len, hd)


def _check_fused(fused, device: str):
    x, w, (q, k, v, cos, sin, pos, nkv, max_len, hd) = _fused_cases(device)
    h = x.float()
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).half()
    assert (fused.rms_norm(x, w, 1e-5).float() - ref.float()).abs().max() <= 2e-3 * ref.float().abs().max()
    caches = [torch.full((nkv, max_len, hd), float("nan"), dtype=torch.float16, device=device) for _ in range(4)]
    out = fused.rope_and_cache(q, k, v, cos, sin, caches[0], caches[1], pos)
    T = q.shape[0]
    qh, kh = q.view(T, -1, hd).transpose(0, 1).float(), k.view(T, nkv, hd).transpose(0, 1).float()
    rot = lambda t: t * cos.float() + torch.roll(t, hd // 2, -1) * sin.float()  # noqa: E731
    assert torch.allclose(out.float(), rot(qh), atol=2e-2, rtol=1e-2)
    assert torch.allclose(caches[0][:, pos].float(), rot(kh), atol=2e-2, rtol=1e-2)
    assert torch.equal(caches[1][:, pos], v.view(T, nkv, hd).transpose(0, 1))
    untouched = torch.ones(max_len, dtype=torch.bool)
    untouched[pos.cpu()] = False
    assert caches[0][:, untouched.to(device)].isnan().all(), "positions other than `positions` were written"
    _check_route_and_sum(fused, device)


def _check_route_and_sum(fused, device: str):
    """route_topk against transformers' router math; weighted_sum against its PyTorch spelling."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=gen).half().to(device)
    gate = (torch.randn(6, 300, generator=gen) * 0.2).half().to(device)  # E = 6: not a power of two
    for k in (1, 2, 3):
        probs = torch.softmax(F.linear(x, gate).float(), -1)
        top = torch.topk(probs, k, -1)
        w, ids = fused.route_topk(x, gate, k)
        assert ids.dtype == torch.int64 and w.dtype == torch.float32 and w.shape == (3, k)
        assert torch.equal(ids.cpu(), top.indices.cpu())
        assert torch.allclose(w, top.values / top.values.sum(-1, keepdim=True), atol=1e-5)
    x128 = torch.randn(2, 300, generator=gen).half().to(device)  # Qwen3's 128 experts, top-8, as the Decoder
    gate128 = (torch.randn(128, 300, generator=gen) * 0.2).half().to(device)  # routes them (logits given)
    probs = torch.softmax(F.linear(x128, gate128).float(), -1)
    top = torch.topk(probs, 8, -1)
    for w, ids in (fused.route_topk(x128, gate128, 8), fused.route_topk(F.linear(x128, gate128), None, 8)):
        assert torch.equal(ids.cpu(), top.indices.cpu())
        assert torch.allclose(w, top.values / top.values.sum(-1, keepdim=True), atol=1e-5)
    logits = torch.randn(2, 8, generator=gen).to(device)  # given logits (random routing)
    w, ids = fused.route_topk(logits, None, 2)
    top = torch.topk(torch.softmax(logits, -1), 2, -1)
    assert torch.equal(ids.cpu(), top.indices.cpu()) and torch.allclose(w.sum(-1), torch.ones(2, device=device))
    y = torch.randn(4, 3, 2500, generator=gen).to(device)  # [split, experts, H], fp32 partial sums
    weights = torch.rand(5, generator=gen).to(device)
    cols = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    ref = (y * weights[[4, 0, 2]].view(1, 3, 1)).sum((0, 1))
    out = fused.weighted_sum(y, weights, cols, torch.float16)
    assert out.dtype == torch.float16 and out.shape == (1, 2500)
    assert torch.allclose(out.float()[0], ref, atol=2e-2, rtol=2e-3)
    out = fused.weighted_sum(y[:1].half(), weights[:3])  # one split, fp16 outputs, weights in order
    assert torch.allclose(out.float()[0], (y[0].half().float() * weights[:3].view(3, 1)).sum(0), atol=2e-2, rtol=2e-3)


def _check_wait_slots(device: str) -> None:
    """wait_slots: buffers of loaded experts at once; an abort or the spin limit ends a wait for a
    missing one with buffer 0 and the 'gave up' flag."""
    row = torch.tensor([3, -1, 5, 7], dtype=torch.int32, device=device)
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    ids = lambda *e: torch.tensor(e, device=device)  # noqa: E731
    assert fused.wait_slots(ids(3, 0, 2), row, flags).tolist() == [7, 3, 5] and flags.tolist() == [0, 0]
    assert fused.wait_slots(ids(0, 1), row, flags, max_spins=5).tolist() == [3, 0] and flags.tolist() == [0, 1]
    flags.copy_(torch.tensor([1, 0]))
    assert fused.wait_slots(ids(1, 3), row, flags).tolist() == [0, 7] and flags.tolist() == [1, 1]


@needs_interpreter
def test_fused_interpreted():
    assert fused._use_triton(torch.zeros(1))
    _check_fused(fused, "cpu")
    _check_wait_slots("cpu")


@pytest.mark.gpu
def test_wait_slots_sees_a_copy_land_while_it_runs():
    """The kernel spins on the compute stream until another stream's copy fills the row in."""
    import time

    _check_wait_slots("cuda")
    row = torch.tensor([-1, -1, 9, -1], dtype=torch.int32, device="cuda")
    flags = torch.zeros(2, dtype=torch.int32, device="cuda")
    src = torch.tensor([4], dtype=torch.int32).pin_memory()
    side = torch.cuda.Stream()
    # the same copy once before the wait: on the H200, run alone, the process's first copy from another
    # stream did not land until the spinning kernel gave up (flags [0, 1]); a second one landed under it
    # (likely the driver loading code lazily, which waits for the running kernel)
    with torch.cuda.stream(side):
        torch.empty(1, dtype=torch.int32, device="cuda").copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    out = fused.wait_slots(torch.tensor([2, 1], device="cuda"), row, flags)
    done = torch.cuda.Event()
    done.record()
    time.sleep(0.2)
    assert not done.query(), "the wait ended before its expert was loaded"
    with torch.cuda.stream(side):
        row[1:2].copy_(src, non_blocking=True)
    done.synchronize()
    assert out.tolist() == [9, 4] and flags.tolist() == [0, 0]


def test_fused_fallback():
    if not INTERPRETING:
        assert not fused._use_triton(torch.zeros(1))
    _check_fused(fused, "cpu")


@pytest.mark.gpu
def test_fused_cuda():
    """On every GPU, while cuda:0 is the current device (layers split over GPUs run like this)."""
    for i in range(torch.cuda.device_count()):
        _check_fused(fused, f"cuda:{i}")


@pytest.mark.gpu
def test_shared_x_cuda():
    """One quantize_x for 4-bit projections of one x; a 2-bit spec beside them wants other words: None."""
    gen = torch.Generator().manual_seed(12)
    specs = [make_spec(shape, 4, 64, 1) for shape in ((4096, 4096), (1024, 4096))]
    x = torch.randn(1, 4096, generator=gen).half().cuda()
    xq = kernels.shared_x(x, specs)
    assert xq is not None
    for spec in specs:
        t = random_tensors(spec, gen, "cuda")
        assert torch.equal(kernels.qlinear(x, t, spec, xq), kernels.qlinear(x, t, spec))
    assert kernels.shared_x(x, specs + [make_spec((1024, 4096), 2, 16, 1)]) is None


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
def test_dp4a_whole_tiles_cuda(shape):
    """Mixtral-sized 2-bit GEMVs: unmasked tiles equal the masked kernel bit for bit, every method."""
    gen = torch.Generator().manual_seed(13)
    spec = make_spec(shape, 2, 16, 1)
    t = random_tensors(spec, gen, "cuda")
    x = torch.randn(1, shape[1], generator=gen).half().cuda()
    for method in ("dp4a", "dp4a_shared"):
        y = kernels.qgemv(x, t, spec, method=method)
        assert torch.equal(y, kernels.qgemv(x, t, spec, method=method, even=False)), method


class _Broken:
    """Stands in for a Triton kernel that fails to build on this machine."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("inline PTX is not supported here")
        return launch


@needs_interpreter
def test_dp4a_failure_falls_back_to_words_interpreted(interp, monkeypatch, fresh_capabilities):
    """A GPU stack that cannot build the dp4a kernel decodes on with the fp32 word kernel (one warning),
    on that device only; grouped w2 launches then split K as the word kernel needs."""
    import warnings

    spec = make_spec((40, 256), 2, 16, 1)
    t = random_tensors(spec, torch.Generator().manual_seed(1))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)).half()
    w2 = make_spec((4096, 14336), 2, 16, 1)
    assert interp.grouped_split(w2, x.device) == 1
    monkeypatch.setattr(dp4a, "gemv_dp4a_kernel", _Broken())
    with pytest.warns(RuntimeWarning, match="dp4a GEMV kernel failed"):
        y = interp.qgemv(x, t, spec)
    assert not fresh_capabilities.works(x.device, "dp4a") and fresh_capabilities.works(torch.device("cuda", 3), "dp4a")
    assert rel_err(y, x.double() @ dequantize(t, spec).double().T) < 2e-3
    assert interp.grouped_split(w2, x.device) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: the record keeps later calls off the dp4a kernel
        assert torch.equal(interp.qgemv(x, t, spec), y)
    with pytest.raises(RuntimeError, match="inline PTX"):  # asked for by name: the error is the caller's
        interp.qgemv(x, t, spec, method="dp4a")


@pytest.mark.gpu
def test_gemv_failure_falls_back_to_torch_cuda(monkeypatch, fresh_capabilities):
    """A GPU stack that cannot build the word kernel: qlinear goes on with the pure-torch path there."""
    gen = torch.Generator().manual_seed(14)
    spec = make_spec((64, 256), 3, 64, 1)  # 3-bit: the word kernel's
    t = random_tensors(spec, gen, "cuda")
    x = torch.randn(2, 256, generator=gen).half().cuda()
    monkeypatch.setattr(words, "gemv_words_kernel", _Broken())
    with pytest.warns(RuntimeWarning, match="pure-torch path"):
        y = kernels.qlinear(x, t, spec)
    assert torch.equal(y, kernels.qlinear_reference(x, t, spec))
    assert not kernels.can_fuse(x, spec)


@needs_interpreter
def test_fused_failure_falls_back_to_torch_interpreted(monkeypatch, fresh_capabilities):
    monkeypatch.setattr(fused, "rms_norm_kernel", _Broken())
    x, w, _ = _fused_cases("cpu")
    with pytest.warns(RuntimeWarning, match="fused Decoder kernel failed"):
        y = fused.rms_norm(x, w, 1e-5)
    assert not fused._use_triton(x)  # the rest of the process uses PyTorch ops on this device
    h = x.float()
    assert torch.equal(y, w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).half())
