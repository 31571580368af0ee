"""Time the article's own code (dvmazur/mixtral-offloading, unmodified) under a T4-sized VRAM cap.

Why: issue 19's claim "H200-capped decode >= 5x the article's code in the same call" needs the
article's real implementation timed on the same GPU, in the same command, as ``python3 -m
mixtral_nb.bench``. This runner only imports and calls the article's code; it copies none of it.
It builds the model exactly as the article's ``notebooks/demo.ipynb`` does (its quantization configs,
``OffloadConfig`` arithmetic and ``build_model`` call), then times greedy decoding with transformers
4.36's ``past_key_values`` (no tokenizer: a fixed-seed random prompt).

Environment (the article pins transformers 4.36.1 and hqq 0.1.1, which clash with our stack), so it
runs in its own process::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/artsite .article/whl/*.whl
    PYTHONPATH=/tmp/artsite:.article python3 scripts/article_code_bench.py \\
        --folder /tmp/synth --write-synthetic --json article.json

``.article/src`` holds the article repository's ``src`` package (HEAD, unmodified) and
``.article/whl`` the wheels of its environment; neither is part of this repository.
``--folder`` is a checkpoint in the article's pre-quantized layout (the hub's
``lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo`` or
``mixtral_nb.synthetic.write_article_checkpoint``'s copy of it); with ``--write-synthetic`` a folder
without ``config.json`` is written first by our package, in a child process that does not see the
article's environment.

The article's ``build_model`` reads ``AutoConfig.from_pretrained("mistralai/Mixtral-8x7B-Instruct-v0.1")``,
which needs the hub. Offline, this runner serves the folder's ``config.json`` under that name from a
private hub cache (``HF_HOME`` in a temporary folder, ``HF_HUB_OFFLINE=1``); nothing in
transformers or the article's code is patched.

VRAM cap: after CUDA starts, the CUDA context (device memory used minus torch's reserved bytes) is
subtracted from ``--vram-cap-mib`` (a T4's 15,095 MiB by default) and the rest is given to torch with
``torch.cuda.set_per_process_memory_fraction``, as our own bench does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HUB_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"  # the name the article's build_model loads its config by
INDEX = "model.safetensors.index.json"
T4_CAP_MIB = 15095
MIB = 1 << 20


class BenchError(Exception):
    """A problem the caller must fix (no CUDA, wrong folder, wrong environment): printed as one message."""


# ---------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="article_code_bench.py",
        description="Decode speed of the article's own code (dvmazur/mixtral-offloading) under a VRAM cap.",
    )
    p.add_argument("--article-src", default=str(REPO / ".article"), metavar="DIR",
                   help="folder holding the article's `src` package (default: .article)")
    p.add_argument("--folder", required=True, metavar="DIR", help="checkpoint in the article's pre-quantized layout")
    p.add_argument("--write-synthetic", action="store_true",
                   help="if FOLDER lacks config.json, write our synthetic copy of the article's checkpoint first")
    p.add_argument("--synthetic-layers", type=int, default=32,
                   help="layers of the synthetic checkpoint written by --write-synthetic (32: full size, 18.24 GB)")
    p.add_argument("--offload-per-layer", type=int, default=4, help="experts per layer kept in host memory (notebook: 4)")
    p.add_argument("--buffer-size", type=int, default=4, help="OffloadConfig.buffer_size (notebook: 4)")
    p.add_argument("--vram-cap-mib", type=float, default=T4_CAP_MIB,
                   help="device memory cap counting the CUDA context (default: a T4's 15095 MiB; 0: no cap)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids, fixed seed)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded one at a time after the prompt")
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up run; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt")
    p.add_argument("--json", default=None, metavar="PATH", help="write every number to PATH")
    args = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "repeat", "synthetic_layers", "buffer_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.offload_per_layer < 0:
        p.error(f"--offload-per-layer must be at least 0, got {args.offload_per_layer}")
    if args.vram_cap_mib < 0:
        p.error(f"--vram-cap-mib must be at least 0 (0: no cap), got {args.vram_cap_mib}")
    return args


# ---------------------------------------------------------------------------------------------
# the checkpoint folder


def safetensors_keys(path: Path) -> set[str]:
    """Tensor names in a safetensors file's header (no tensor is read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * MIB:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise BenchError(f"{path} is not a readable safetensors file ({e})") from None
    return {k for k in header if k != "__metadata__"}


def check_layout(folder: Path) -> dict[str, Any]:
    """The folder's config.json if it is in the article's pre-quantized layout; else a BenchError saying why."""
    hint = ("expected the article's pre-quantized folder (lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo, or "
            "mixtral_nb.synthetic.write_article_checkpoint's copy: pass --write-synthetic to write one)")
    if not folder.is_dir():
        raise BenchError(f"{folder} does not exist: {hint}")
    for name in ("config.json", INDEX):
        if not (folder / name).is_file():
            raise BenchError(f"{folder} has no {name}: {hint}")
    try:
        config = json.loads((folder / "config.json").read_text())
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"{folder}: cannot read config.json / {INDEX} ({e}): {hint}") from None
    if config.get("model_type") != "mixtral":
        raise BenchError(f"{folder}/config.json has model_type {config.get('model_type')!r}, not 'mixtral': {hint}")
    layers, experts = config.get("num_hidden_layers"), config.get("num_local_experts")
    if not isinstance(layers, int) or not isinstance(experts, int) or layers < 1 or experts < 1:
        raise BenchError(f"{folder}/config.json lacks num_hidden_layers / num_local_experts: {hint}")
    trunk_name = weight_map.get("model.embed_tokens.weight")
    if trunk_name is None:
        raise BenchError(f"{folder}/{INDEX} maps no model.embed_tokens.weight: {hint}")
    trunk = folder / trunk_name
    if not trunk.is_file():
        raise BenchError(f"{trunk} (the trunk, in {INDEX}) is missing: {hint}")
    trunk_keys = safetensors_keys(trunk)
    if "model.layers.0.self_attn.q_proj.W_q" not in trunk_keys:
        what = "fp16 weights (the original layout)" if "model.layers.0.self_attn.q_proj.weight" in trunk_keys else \
            "no model.layers.0.self_attn.q_proj.W_q"
        raise BenchError(f"{trunk} holds {what}, not the article's pre-quantized attention: {hint}")
    for layer in range(layers):
        for e in range(experts):
            key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.W_q"
            name = weight_map.get(key)
            if name is None:
                raise BenchError(f"{folder}/{INDEX} maps no {key}: {hint}")
            if not (folder / name).is_file():
                raise BenchError(f"{folder / name} (expert {layer}.{e}) is missing: {hint}")
    first = folder / weight_map["model.layers.0.block_sparse_moe.experts.0.w1.W_q"]
    if "w1.W_q" not in safetensors_keys(first):
        raise BenchError(f"{first} has no unprefixed w1.W_q (one expert per file): {hint}")
    return config


def write_synthetic(folder: Path, layers: int) -> None:
    """Write our synthetic article-layout checkpoint with our package, in a child process whose path
    holds this repository only (the article's transformers 4.36 must not shadow ours there)."""
    code = ("import sys\nfrom mixtral_nb.synthetic import write_article_checkpoint\n"
            "write_article_checkpoint(sys.argv[1], num_layers=int(sys.argv[2]), progress=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("TQDM_MININTERVAL", "15")  # a progress line every 15 s, not a flood in a captured log
    print(f"# writing a synthetic {layers}-layer article checkpoint to {folder} (our package, separate process)",
          flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(layers)], env=env, cwd=str(REPO))
    if done.returncode:
        raise BenchError(f"writing the synthetic checkpoint to {folder} failed (exit {done.returncode}; see above)")
    print(f"# written in {time.perf_counter() - t0:.1f} s", flush=True)


def serve_hub_config(config: dict[str, Any], home: Path) -> None:
    """A hub cache under ``home`` holding ``config`` as HUB_MODEL's config.json (what the article's
    build_model asks the hub for), used offline through HF_HOME (set before transformers is imported)."""
    data = (json.dumps(config, indent=2) + "\n").encode()
    commit = hashlib.sha1(data).hexdigest()
    repo = home / "hub" / ("models--" + HUB_MODEL.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (home / "hub" / "version.txt").write_text("1")  # transformers' cache-format marker: no migration attempt
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


# ---------------------------------------------------------------------------------------------
# the article's code


def import_article(article_src: Path) -> dict[str, Any]:
    """The article's build_model pieces and hqq's BaseQuantizeConfig, from ``article_src``/src."""
    transformers = importlib.import_module("transformers")
    if not transformers.__version__.startswith("4.36"):
        raise BenchError(f"transformers {transformers.__version__} ({transformers.__file__}) is on the path; the "
                         "article's code pins 4.36.1: install .article/whl into /tmp/artsite and put it first on "
                         "PYTHONPATH (see this script's docstring)")
    sys.path.insert(0, str(article_src))
    build = importlib.import_module("src.build_model")
    hqq = importlib.import_module("hqq.core.quantize")
    return {"OffloadConfig": build.OffloadConfig, "QuantConfig": build.QuantConfig,
            "build_model": build.build_model, "BaseQuantizeConfig": hqq.BaseQuantizeConfig,
            "transformers": transformers.__version__}


def notebook_configs(art: dict[str, Any], config: dict[str, Any], offload_per_layer: int,
                     buffer_size: int) -> tuple[Any, Any]:
    """(quant_config, offload_config) with the article's notebook's values and arithmetic."""
    num_experts = config["num_local_experts"]
    if offload_per_layer > num_experts:
        raise BenchError(f"--offload-per-layer {offload_per_layer} exceeds the {num_experts} experts per layer")
    offload_config = art["OffloadConfig"](
        main_size=config["num_hidden_layers"] * (num_experts - offload_per_layer),
        offload_size=config["num_hidden_layers"] * offload_per_layer,
        buffer_size=buffer_size,
        offload_per_layer=offload_per_layer,
    )
    base = art["BaseQuantizeConfig"]
    attn_config = base(nbits=4, group_size=64, quant_zero=True, quant_scale=True)
    attn_config["scale_quant_params"]["group_size"] = 256
    ffn_config = base(nbits=2, group_size=16, quant_zero=True, quant_scale=True)
    return art["QuantConfig"](ffn_config=ffn_config, attn_config=attn_config), offload_config


def cache_counters(model: Any) -> tuple[int, int] | None:
    """(hits, misses) summed over the article's ExpertCache eviction groups, or None if it keeps none."""
    try:
        cache = model.model.layers[0].block_sparse_moe.experts
        groups = cache.group_infos.values()
        return sum(int(g.hits) for g in groups), sum(int(g.misses) for g in groups)
    except (AttributeError, IndexError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# device memory


def cap_vram(torch: Any, device: Any, cap_mib: float) -> dict[str, float | None]:
    """Start CUDA, measure its context, and cap torch at ``cap_mib`` minus that context."""
    torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    context = max(0, total - free - torch.cuda.memory_reserved(device))
    out: dict[str, float | None] = {"total_mib": total / MIB, "context_mib": context / MIB, "cap_mib": None,
                                    "fraction": None}
    if cap_mib:
        fraction = (cap_mib * MIB - context) / total
        if not 0 < fraction <= 1:
            raise BenchError(f"--vram-cap-mib {cap_mib:g} leaves nothing (or more than the GPU's {total / MIB:.0f} MiB) "
                             f"after the CUDA context's {context / MIB:.0f} MiB")
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        out.update(cap_mib=float(cap_mib), fraction=fraction)
    return out


def process_vram_mib() -> float | None:
    """This process's device memory as NVML sees it (None without pynvml or per-process accounting)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            idx = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
            handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return proc.usedGpuMemory / MIB
        finally:
            pynvml.nvmlShutdown()
    except (pynvml.NVMLError, ValueError):
        return None
    return None


class MemoryWatch:
    """Peaks of device memory: torch's allocated/reserved, device-wide used (mem_get_info), NVML's per-process."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device
        self.used_mib = 0.0
        self.nvml_mib: float | None = None

    def sample(self) -> None:
        free, total = self.torch.cuda.mem_get_info(self.device)
        self.used_mib = max(self.used_mib, (total - free) / MIB)
        nv = process_vram_mib()
        if nv is not None:
            self.nvml_mib = max(self.nvml_mib or 0.0, nv)

    def report(self) -> dict[str, float | None]:
        self.sample()
        cuda = self.torch.cuda
        return {"peak_allocated_mib": cuda.max_memory_allocated(self.device) / MIB,
                "peak_reserved_mib": cuda.max_memory_reserved(self.device) / MIB,
                "peak_device_used_mib": self.used_mib, "peak_nvml_process_mib": self.nvml_mib}


# ---------------------------------------------------------------------------------------------
# timing


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_once(torch: Any, model: Any, prompt: Any, new_tokens: int, device: Any) -> dict[str, Any]:
    """Prefill ``prompt`` (yields the first token), then ``new_tokens`` greedy one-token steps fed with
    the returned past_key_values; seconds of each part, and the cache's hits/misses during the decode."""
    with torch.inference_mode():
        _sync(torch, device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(torch, device)
        t_prefill = time.perf_counter() - t0
        past = out.past_key_values
        before = cache_counters(model)
        tokens = [token]
        _sync(torch, device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(token)
        _sync(torch, device)
        t_decode = time.perf_counter() - t0
        after = cache_counters(model)
        finite = bool(torch.isfinite(out.logits).all())
    counts = None if before is None or after is None else (after[0] - before[0], after[1] - before[1])
    return {"prefill_s": t_prefill, "decode_s": t_decode, "tok_s": new_tokens / t_decode, "hits_misses": counts,
            "finite": finite, "tokens": torch.cat(tokens, dim=1)[0].tolist()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check the folder and environment, serve the config offline, then measure."""
    folder = Path(args.folder).expanduser().resolve()
    article_src = Path(args.article_src).expanduser().resolve()
    if not (article_src / "src" / "build_model.py").is_file():
        raise BenchError(f"{article_src}/src/build_model.py is missing: pass --article-src, the folder holding the "
                         "article repository's src package (dvmazur/mixtral-offloading)")
    import torch

    if not torch.cuda.is_available():
        raise BenchError("no CUDA device: the article's code runs on CUDA only (triton kernels, pinned host memory); "
                         "run this on a GPU machine")
    if args.write_synthetic and not (folder / "config.json").exists():
        write_synthetic(folder, args.synthetic_layers)
    config = check_layout(folder)
    hub_home = Path(tempfile.mkdtemp(prefix="article_hub_"))
    try:
        serve_hub_config(config, hub_home)
        return measure(args, torch, folder, config, import_article(article_src))
    finally:
        shutil.rmtree(hub_home, ignore_errors=True)


def measure(args: argparse.Namespace, torch: Any, folder: Path, config: dict[str, Any],
            art: dict[str, Any]) -> dict[str, Any]:
    """Build the article's model as its notebook does, then time ``repeat`` greedy generations after a warm-up."""

    device = torch.device("cuda", torch.cuda.current_device())
    mem = cap_vram(torch, device, args.vram_cap_mib)
    watch = MemoryWatch(torch, device)
    quant_config, offload_config = notebook_configs(art, config, args.offload_per_layer, args.buffer_size)
    print(f"# article's code: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, transformers "
          f"{art['transformers']}; cap {mem['cap_mib']} MiB with a {mem['context_mib']:.0f} MiB CUDA context; "
          f"{offload_config}", flush=True)

    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model = art["build_model"](device=device, quant_config=quant_config, offload_config=offload_config,
                               state_path=str(folder))
    torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    watch.sample()
    print(f"# built in {build_s:.1f} s; {torch.cuda.memory_allocated(device) / MIB:.0f} MiB allocated", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config["vocab_size"], (1, args.prompt_len), generator=gen).to(device)
    runs = []
    for i in range(args.repeat + 1):  # the first is the warm-up (triton autotuning and compilation)
        r = generate_once(torch, model, prompt, args.new_tokens, device)
        watch.sample()
        print(f"# {'warm-up' if i == 0 else f'run {i}'}: prefill {r['prefill_s']:.3f} s, decode {r['tok_s']:.3f} tok/s",
              flush=True)
        if i:
            runs.append(r)
    counts = [r["hits_misses"] for r in runs]
    hit_rate = None
    if all(c is not None for c in counts):
        hits, misses = sum(c[0] for c in counts), sum(c[1] for c in counts)
        hit_rate = hits / (hits + misses) if hits + misses else None
    end_free, end_total = torch.cuda.mem_get_info(device)
    return {
        "decode_tok_s": statistics.median(r["tok_s"] for r in runs),
        "decode_tok_s_runs": [r["tok_s"] for r in runs],
        "prefill_s": statistics.median(r["prefill_s"] for r in runs),
        "prefill_s_runs": [r["prefill_s"] for r in runs],
        "build_s": build_s,
        "expert_hit_rate": hit_rate,
        "expert_hits_misses_runs": counts,
        "finite": all(r["finite"] for r in runs),
        "same_tokens_every_run": all(r["tokens"] == runs[0]["tokens"] for r in runs),
        "vram": {**mem, **watch.report(),
                 "context_end_mib": max(0, end_total - end_free - torch.cuda.memory_reserved(device)) / MIB},
        "offload_config": {"main_size": offload_config.main_size, "offload_size": offload_config.offload_size,
                           "buffer_size": offload_config.buffer_size,
                           "offload_per_layer": offload_config.offload_per_layer},
        "model": {k: config.get(k) for k in ("num_hidden_layers", "num_local_experts", "hidden_size",
                                             "intermediate_size", "vocab_size")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": art["transformers"], "gpu": torch.cuda.get_device_name(device)},
    }


def summary(res: dict[str, Any], args: argparse.Namespace) -> str:
    v = res["vram"]
    hit = "n/a" if res["expert_hit_rate"] is None else f"{res['expert_hit_rate']:.3f}"
    nv = "n/a" if v["peak_nvml_process_mib"] is None else f"{v['peak_nvml_process_mib']:.0f}"
    return "\n".join([
        f"article.decode_tok_s = {res['decode_tok_s']:.4f}   (median of {args.repeat}: "
        + ", ".join(f"{x:.3f}" for x in res["decode_tok_s_runs"]) + ")",
        f"article.prefill_s = {res['prefill_s']:.4f}   ({args.prompt_len} tokens)",
        f"article.build_s = {res['build_s']:.2f}",
        f"article.expert_hit_rate = {hit}   (decode steps only, from ExpertCache's hits/misses)",
        f"article.vram_cap_mib = {v['cap_mib']}   (context {v['context_mib']:.0f} MiB at start, "
        f"{v['context_end_mib']:.0f} at end)",
        f"article.peak_allocated_mib = {v['peak_allocated_mib']:.0f}   reserved {v['peak_reserved_mib']:.0f}, "
        f"device used {v['peak_device_used_mib']:.0f}, NVML process {nv}",
        f"article.finite = {res['finite']}   same tokens every run: {res['same_tokens_every_run']}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = run(args)
    except BenchError as e:
        print(f"article_code_bench: {e}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "error": str(e)}, indent=1) + "\n")
        return 2
    except Exception as e:  # e.g. out of memory under the cap, or a kernel failing: recorded, then raised
        if args.json:
            err = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            Path(args.json).write_text(json.dumps({"args": vars(args), "error": err}, indent=1) + "\n")
        raise
    print(summary(res, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "article": res}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
