"""Kernel checks for the GPU machine: sm_75 (T4) builds and GEMV micro-benchmarks.

    python scripts/kernel_bench.py compile [--arch 75 --arch 90] [--out DIR]   # no GPU needed
    python scripts/kernel_bench.py bench [--sweep]                             # needs CUDA

``compile`` builds every kernel variant the engine launches (``kernels.COMPILE_LIST``) with
``triton.compile`` for the given compute capabilities (Triton bundles ptxas, so this runs on a
CPU-only machine too) and prints registers/spills from the bundled cuobjdump. ``bench`` times the
Mixtral expert and attention GEMVs (both code layouts; the article's axis-0 one against the element-wise
kernel too) against a device-to-device copy, each call captured in a CUDA graph (the GPU's time, as
decode's graphs pay it) and rotating over enough weight copies to defeat the L2 cache; ``--sweep``
also tries other block shapes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mixtral_nb import kernels  # noqa: E402
from mixtral_nb.config import article_quant_config  # noqa: E402
from mixtral_nb.quant import QSpec  # noqa: E402

EXPERT = article_quant_config().ffn
ATTN = article_quant_config().attn


def spec_of(shape, params, **kw) -> QSpec:
    p = dict(params)
    p.update(kw)
    return QSpec.make(shape, p)


def compile_all(archs: list[int], out_dir: Path | None, sass: bool = False, **blocks) -> bool:
    import triton
    from triton.backends.compiler import GPUTarget

    ok = True
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for arch in archs:
        cases = kernels.compile_cases(**blocks) if any(v is not None for v in blocks.values()) else kernels.COMPILE_LIST
        for name, fn, sig, cx, ints, warps in cases:
            cx = dict(cx, **{a: 1 for a, v in ints.items() if v == 1})
            sig = dict(sig, **{a: "i32" for a, v in ints.items() if v != 1})
            full_sig = {a: ("constexpr" if a in cx else sig[a]) for a in fn.arg_names}
            # what the launcher specializes at run time: 16-byte aligned pointers, ints divisible by 16
            aligned = [a for a in sig if sig[a].startswith("*") or (a in ints and ints[a] % 16 == 0)]
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
            try:
                src = triton.compiler.ASTSource(fn=fn, signature=full_sig, constexprs=cx, attrs=attrs)
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                cubin = k.asm["cubin"]
                ptx = k.asm["ptx"]
                info = ""
                if out_dir is not None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    path = out_dir / f"{name}_sm{arch}.cubin"
                    path.write_bytes(cubin)
                    if cuobjdump.exists():
                        r = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True,
                                           text=True)
                        m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", r.stdout)
                        if m:
                            info = f"regs={m.group(1)} stack={m.group(2)} smem={m.group(3)} local={m.group(4)}"
                        if sass:
                            r = subprocess.run([str(cuobjdump), "--dump-sass", str(path)], capture_output=True,
                                               text=True)
                            ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", r.stdout,
                                             re.M)
                            counts = {op: ops.count(op) for op in sorted(set(ops))}
                            top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
                            info += f" sass={len(ops)} " + " ".join(f"{o}:{c}" for o, c in top)
                # sm_75 has none of these; newer GPUs may use cp.async (the pipelined loops, sm_80+)
                bad = [w for w in ("bf16", "cp.async", "mma.sync", "wgmma") if w in ptx and (arch < 80 or w != "cp.async")]
                print(f"compile sm_{arch} {name}: OK cubin={len(cubin)}B {info} {'SUSPECT ' + str(bad) if bad else ''}")
            except Exception as e:  # report and carry on: every variant's status is wanted
                ok = False
                print(f"compile sm_{arch} {name}: FAILED {type(e).__name__}: {str(e)[:400]}")
    return ok


# ---------------------------------------------------------------------------------------------
# micro-benchmarks


def random_weights(spec: QSpec, copies: int) -> list[dict[str, torch.Tensor]]:
    from mixtral_nb.bench import fill_quantized

    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(copies):
        t = {s.name: torch.empty(s.shape, dtype=s.dtype, device="cuda") for s in spec.layout().segments}
        fill_quantized(t, spec, gen)
        sets.append(t)
    return sets


def weight_bytes(spec: QSpec) -> int:
    return spec.layout().raw_bytes


def time_fn(fn, n_sets: int) -> float:
    """Median seconds of ``fn(i)`` cycling i over weight sets, timed with CUDA events."""
    import triton.testing

    state = {"i": 0}

    def call():
        fn(state["i"] % n_sets)
        state["i"] += 1

    return triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median") / 1e3


def time_graphed(fn, n_sets: int, calls: int = 64) -> float:
    """Seconds per ``fn(i)`` with ``calls`` calls (cycling i over weight sets) captured in one CUDA
    graph: the GPU's time alone, as decode pays it inside its graphs (no Python launch overhead)."""
    import triton.testing

    for i in range(n_sets):  # compile and warm up outside the capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % n_sets)
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") / 1e3 / calls


def copy_bw() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    import triton.testing

    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median") / 1e3
    return 2 * (1 << 30) / t


SWEEP = [  # (block_n, block_k weights, warps, tiles) tried for T=1
    (16, 512, 4, 4), (16, 256, 4, 4), (8, 512, 4, 4), (8, 512, 2, 4), (8, 256, 2, 4), (16, 512, 8, 4),
    (32, 256, 4, 4), (8, 1024, 4, 4), (16, 256, 2, 4), (4, 512, 1, 4), (16, 512, 4, 2), (32, 512, 4, 2),
    (16, 512, 4, 1), (32, 512, 4, 1), (64, 256, 4, 1), (32, 256, 8, 2),
]


def launch_overhead_us(fn, n: int = 2000) -> float:
    """Host microseconds per call (no synchronisation): what decode pays per launch on the CPU."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / n * 1e6


def bench(sweep: bool, only: list[str] | None = None) -> None:
    bw = copy_bw()
    print(f"d2d copy bandwidth (read+write): {bw / 1e9:.0f} GB/s; 'of copy bw' = bytes read / time / that")
    cases = [("expert w1/w3 2-bit g16", spec_of((14336, 4096), EXPERT)),
             ("expert w2 2-bit g16", spec_of((4096, 14336), EXPERT)),
             ("expert w1 3-bit g64", spec_of((14336, 4096), EXPERT, nbits=3, group_size=64)),
             ("attn q/o 4-bit g64", spec_of((4096, 4096), ATTN)),
             ("attn k/v 4-bit g64", spec_of((1024, 4096), ATTN)),
             ("expert w1 2-bit axis0", spec_of((14336, 4096), EXPERT, axis=0)),  # the article's files
             ("expert w2 2-bit axis0", spec_of((4096, 14336), EXPERT, axis=0)),
             ("attn q/o 4-bit axis0", spec_of((4096, 4096), ATTN, axis=0)),
             ("attn k/v 4-bit axis0", spec_of((1024, 4096), ATTN, axis=0))]
    rows = []
    for name, spec in cases:
        if only and not any(o in name for o in only):
            continue
        nbytes = weight_bytes(spec)
        copies = max(2, -(-256 * 2**20 // nbytes))  # > 4x the 60 MB L2
        sets = random_weights(spec, copies)
        x = torch.randn(4, spec.in_features, device="cuda", dtype=torch.float16)
        err = 0.0
        for t in (1, 2, 3, 4, 5, 9, 33):  # correctness on this GPU: every row count path, poisoned outputs
            xt = torch.randn(t, spec.in_features, device="cuda", dtype=torch.float16)
            ref = kernels.qlinear_reference(xt.float(), sets[0], spec)
            if t <= kernels.GEMV_MAX_T:
                out = torch.full((t, spec.out_features), float("nan"), device="cuda", dtype=torch.float16)
                y = kernels.qgemv(xt, sets[0], spec, out=out).float()
            else:
                y = kernels.qlinear(xt, sets[0], spec).float()
            e = ((y - ref).norm() / ref.norm()).item()
            err = max(err, e if e == e else float("inf"))
        print(f"{name}: max rel err vs reference over T=1..33: {err:.1e} {'OK' if err < 2e-3 else 'FAIL'}")
        for t in (1, 2, 4):  # the GPU's time, as decode's graphs pay it
            sec = time_graphed(lambda i: kernels.qgemv(x[:t], sets[i], spec), copies)
            rows.append((name, t, "default", sec, nbytes / sec / 1e9, nbytes / sec / bw, err))
            if kernels.plan(spec)["axis0"]:  # against the element-wise kernel axis 0 took before
                sec = time_graphed(lambda i: kernels.qgemv(x[:t], sets[i], spec, method="generic"), copies)
                rows.append((name, t, "element-wise", sec, nbytes / sec / 1e9, nbytes / sec / bw, err))
        if sweep and kernels.plan(spec)["axis0"]:
            pa = kernels.plan(spec)["pa"]
            for bw_, nw in AXIS0_SWEEP:
                sec = time_graphed(lambda i: kernels.qgemv(x[:1], sets[i], spec, method="axis0", block_k=bw_ * 32 // pa,
                                                           num_warps=nw), copies)
                print(f"  sweep {name} T=1 axis0 block_w={bw_:3d} warps={nw}: {sec * 1e6:7.1f} us "
                      f"{nbytes / sec / 1e9:6.0f} GB/s {nbytes / sec / bw:5.2f}")
        if sweep and kernels.plan(spec)["words"] and "2-bit g16" in name:
            best = None
            for bn, bk, nw, tiles in SWEEP:
                try:
                    sec = time_fn(lambda i: kernels.qgemv(x[:1], sets[i], spec, block_n=bn, block_k=bk, num_warps=nw,
                                                          tiles=tiles), copies)
                except Exception as e:  # a config that does not compile (registers) is just skipped
                    print(f"  sweep {name} bn={bn} bk={bk} w={nw} r={tiles}: {type(e).__name__} {str(e)[:100]}")
                    continue
                print(f"  sweep {name} T=1 bn={bn:2d} bk={bk:4d} warps={nw} tiles={tiles}: {sec * 1e6:7.1f} us "
                      f"{nbytes / sec / 1e9:6.0f} GB/s {nbytes / sec / bw:5.2f}")
                if best is None or sec < best[0]:
                    best = (sec, bn, bk, nw, tiles)
            if best:
                rows.append((name, 1, "best bn={} bk={} w={} r={}".format(*best[1:]), best[0],
                             nbytes / best[0] / 1e9, nbytes / best[0] / bw, err))
        sec = time_fn(lambda i: kernels.dequantize_fused(sets[i], spec), copies)
        wbytes = spec.out_features * spec.in_features * 2
        rows.append((name, 0, "dequant->fp16 (r+w)", sec, (nbytes + wbytes) / sec / 1e9, (nbytes + wbytes) / sec / bw,
                     float("nan")))
        w16 = torch.randn(spec.out_features, spec.in_features, device="cuda", dtype=torch.float16)
        sec = time_fn(lambda i: torch.nn.functional.linear(x[:1], w16), 1)
        rows.append((name, 1, "fp16 F.linear", sec, wbytes / sec / 1e9, wbytes / sec / bw, float("nan")))
        host = launch_overhead_us(lambda: kernels.qlinear(x[:1], sets[0], spec))
        print(f"{name}: host time per qlinear call (T=1, no sync) {host:.1f} us")
        sets.clear()
        w16 = None
        torch.cuda.empty_cache()
    print(f"\n{'case':24s} {'T':>2s} {'variant':26s} {'us':>8s} {'GB/s':>7s} {'of copy bw':>10s} {'rel err':>9s}")
    for name, t, var, sec, gbs, frac, err in rows:
        print(f"{name:24s} {t:2d} {var:26s} {sec * 1e6:8.1f} {gbs:7.0f} {frac:10.2f} {err:9.1e}")


AXIS0_SWEEP = [(32, 1), (32, 2), (64, 2), (64, 4), (128, 2), (128, 4), (128, 8), (256, 4), (256, 8)]  # (words, warps)

DP4A_SWEEP = [  # (block_n, block_w words, warps) for the dp4a kernel
    (8, 64, 4), (16, 64, 4), (8, 32, 2), (8, 64, 2), (4, 64, 2), (16, 32, 4), (8, 128, 4), (4, 128, 4), (32, 32, 4),
    (16, 128, 8),
]


def grouped_setup():
    """A layer's worth of decode launches: 8 expert slots of random 2-bit weights (more than the L2
    holds), pairs of slots as the router picks them, x for w1/w3 and h (2 rows) for w2."""
    from mixtral_nb.bench import fill_quantized
    from mixtral_nb.expert import ExpertFormat

    fmt = ExpertFormat.make(4096, 14336, dict(EXPERT), torch.float16)
    n_slots = 8
    buf = torch.empty(n_slots, fmt.layout.total_bytes, dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(n_slots):
        for v, spec in zip(fmt.views(buf[i]), fmt.specs):
            fill_quantized(v, spec, gen)
    views = fmt.views(buf[0])
    s1, _, s2 = fmt.specs
    pairs = [torch.tensor([i, (i + 3) % n_slots], dtype=torch.int32, device="cuda") for i in range(n_slots)]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    h = torch.randn(2, 14336, device="cuda", dtype=torch.float16)
    return (views, s1, s2, pairs, x, h, 2 * (weight_bytes(s1) * 2), 2 * weight_bytes(s2), n_slots, buf.stride(0),
            fmt.w3_offset)


SHAPES_SWEEP = [  # (block_n, block_w words, warps)
    (8, 64, 4), (16, 64, 8), (16, 32, 4), (32, 32, 4),
]


def bench_shapes() -> None:
    """dp4a / dp4a_shared block shapes on the grouped decode launches (w1+w3 and w2 of 2 experts)."""
    bw = copy_bw()
    print(f"d2d copy bandwidth (read+write): {bw / 1e9:.0f} GB/s; fraction below = bytes read / time / that")
    views, s1, s2, pairs, x, h, b13, b2, n_slots, stride, w3 = grouped_setup()
    ref13 = kernels.qgemv_grouped(x, views[0], s1, pairs[0], stride, 2, w3, method="dp4a").float()
    runs = [(m, sh) for m in ("dp4a", "dp4a_shared") for sh in SHAPES_SWEEP]
    for method, (bn, bwd, nw) in runs:
        kw = dict(method=method, block_n=bn, block_k=bwd * 16, num_warps=nw)
        try:
            y = kernels.qgemv_grouped(x, views[0], s1, pairs[0], stride, 2, w3, **kw).float()
            err = ((y - ref13).norm() / ref13.norm()).item()
            t13 = time_graphed(lambda i: kernels.qgemv_grouped(x, views[0], s1, pairs[i], stride, 2, w3, **kw),
                               n_slots)
            res = f"w13 {t13 * 1e6:6.1f} us {b13 / t13 / bw:5.3f} err {err:.0e}"
            for split in (1, 4):
                t2 = time_graphed(lambda i: kernels.qgemv_grouped(h, views[2], s2, pairs[i], stride, split=split,
                                                                  **kw), n_slots)
                res += f"  w2/{split} {t2 * 1e6:6.1f} us {b2 / t2 / bw:5.3f}"
        except Exception as e:  # a shape that does not build is reported and skipped
            res = f"{type(e).__name__}: {str(e)[:120]}"
        print(f"  {method:11s} bn={bn:2d} bw={bwd:3d} warps={nw}: {res}")


def bench_methods(sweep: bool) -> None:
    """The one-token GEMVs as decode launches them: dp4a vs words, plain and grouped (2 experts)."""
    bw = copy_bw()
    print(f"d2d copy bandwidth (read+write): {bw / 1e9:.0f} GB/s; HBM fraction below = bytes read / time / that")
    cases = [("w1 2-bit 14336x4096", spec_of((14336, 4096), EXPERT)), ("w2 2-bit 4096x14336", spec_of((4096, 14336), EXPERT)),
             ("q/o 4-bit 4096x4096", spec_of((4096, 4096), ATTN)), ("k/v 4-bit 1024x4096", spec_of((1024, 4096), ATTN))]
    for name, spec in cases:
        nbytes = weight_bytes(spec)
        copies = max(2, -(-256 * 2**20 // nbytes))
        sets = random_weights(spec, copies)
        x = torch.randn(1, spec.in_features, device="cuda", dtype=torch.float16)
        ref = kernels.qlinear_reference(x.float(), sets[0], spec)
        for method in kernels.METHODS:
            y = kernels.qgemv(x, sets[0], spec, method=method).float()
            err = ((y - ref).norm() / ref.norm()).item()
            sec = time_graphed(lambda i: kernels.qgemv(x, sets[i], spec, method=method), copies)
            print(f"{name:22s} {method:10s} {sec * 1e6:7.1f} us {nbytes / sec / 1e9:6.0f} GB/s {nbytes / sec / bw:5.2f} "
                  f"rel err {err:.1e}")
        if sweep:
            for bn, bwd, nw in DP4A_SWEEP:
                sec = time_graphed(lambda i: kernels.qgemv(x, sets[i], spec, method="dp4a", block_n=bn,
                                                      block_k=bwd * 32 // kernels.plan(spec)["pa"], num_warps=nw), copies)
                print(f"  sweep {name} dp4a bn={bn:2d} bw={bwd:3d} warps={nw}: {sec * 1e6:7.1f} us "
                      f"{nbytes / sec / bw:5.2f}")
        sets.clear()
        torch.cuda.empty_cache()
    views, s1, s2, pairs, x, h, b13, b2, n_slots, stride, w3 = grouped_setup()
    for method in kernels.METHODS:
        sec = time_graphed(lambda i: kernels.qgemv_grouped(x, views[0], s1, pairs[i], stride, 2, w3,
                                                      method=method), n_slots)
        print(f"grouped w1+w3 x2 experts {method:5s} {sec * 1e6:7.1f} us {b13 / sec / bw:5.2f}")
        for split in (1, 2, 4, 8):
            sec = time_graphed(lambda i: kernels.qgemv_grouped(h, views[2], s2, pairs[i], stride, split=split,
                                                          method=method), n_slots)
            print(f"grouped w2 x2 experts {method:5s} split={split} {sec * 1e6:7.1f} us {b2 / sec / bw:5.2f}")
    if sweep:
        for bn, bwd, nw in DP4A_SWEEP:
            kw = dict(method="dp4a", block_n=bn, block_k=bwd * 16, num_warps=nw)
            t13 = time_graphed(lambda i: kernels.qgemv_grouped(x, views[0], s1, pairs[i], stride, 2, w3,
                                                          **kw), n_slots)
            t2 = time_graphed(lambda i: kernels.qgemv_grouped(h, views[2], s2, pairs[i], stride, split=4, **kw),
                         n_slots)
            print(f"  sweep grouped dp4a bn={bn:2d} bw={bwd:3d} warps={nw}: w13 {t13 * 1e6:6.1f} us "
                  f"{b13 / t13 / bw:5.2f}  w2(split4) {t2 * 1e6:6.1f} us {b2 / t2 / bw:5.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--arch", type=int, action="append")
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("--sass", action="store_true", help="print instruction counts (needs --out)")
    c.add_argument("--block-n", type=int)
    c.add_argument("--block-k", type=int)
    c.add_argument("--warps", type=int)
    c.add_argument("--tiles", type=int)
    b = sub.add_parser("bench")
    b.add_argument("--sweep", action="store_true")
    b.add_argument("--cases", default=None, help="comma-separated substrings of case names to run")
    b.add_argument("--methods", action="store_true", help="dp4a vs words, plain and grouped (decode's launches)")
    b.add_argument("--shapes", action="store_true", help="sweep dp4a block shapes on the grouped launches")
    a = p.parse_args(argv)
    if a.cmd == "compile":
        return 0 if compile_all(a.arch or [75], a.out, a.sass, block_n=a.block_n, block_k=a.block_k,
                                warps=a.warps, tiles=a.tiles) else 1
    if a.shapes:
        bench_shapes()
        return 0
    if a.methods:
        bench_methods(a.sweep)
        return 0
    bench(a.sweep, a.cases.split(",") if a.cases else None)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
