"""Quality vs size: perplexity and bytes of the embedded model at several quantization settings,
plus the per-layer expert-cache measurements the charts notebook shows.

Every configuration goes through mixtral_nb's own path: ``checkpoint.quantize`` writes a project
checkpoint of the embedded (SmolLM2-based) Mixtral, ``build_model`` loads it with offloaded experts
(``offload_per_layer=4``, like the article), and the model is scored on the first ``n_tokens``
tokens of CPython's ``pydoc_data/topics.py`` (text every Python install has). Each configuration
also holds a three-turn chat greedily (32 tokens per reply at most) in one ``ChatSession``, as the chat
widget does: "What is the capital of France?" (``paris``: the reply names Paris), then two follow-ups
that only make sense with the earlier turns in context (``TURNS``; ``follow_ups``: every reply names its
answer). The embedded model's default is the smallest setting that passes all three.

The HQQ solves make this slow on CPU (minutes per configuration), so results are cached in
``<cache>/quality/results.json`` and the repo ships a precomputed table,
``notebooks/quality_embedded.json``, made with ``python -m mixtral_nb.quality --out ...``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .build import build_model
from .chat import ChatSession
from .checkpoint import load_config, quantize, read_header
from .config import OffloadConfig, QuantConfig
from .embedded import EMBEDDED_VERSION, build_embedded
from .moe import OffloadedExperts
from .paths import cache_root

__all__ = ["CONFIGS", "CacheProbe", "PRECOMPUTED", "QUESTION", "TURNS", "format_table", "load_results", "measure",
           "plot_layer_hit_rates", "plot_quality", "quality_table", "quant_config", "smallest_passing",
           "smallest_sensible", "write_results"]

QUESTION = "What is the capital of France?"
ANSWER = "Paris"
ANSWER_TOKENS = 32  # greedy reply length for the Paris check
# The multi-turn check: each message with the word its reply must contain. The follow-ups lean on the
# turns before them ("there"), which is where a too-coarse quantization first talks nonsense.
TURNS: tuple[tuple[str, str], ...] = (
    (QUESTION, ANSWER),
    ("What is the capital of Italy?", "Rome"),
    ("What language do people speak there?", "Italian"),
)
PRECOMPUTED = "quality_embedded.json"

# name -> (expert setting, attention setting); a setting is None (fp16) or (nbits, group_size)
CONFIGS: dict[str, tuple[tuple[int, int] | None, tuple[int, int] | None]] = {
    "experts fp16, attn fp16": (None, None),
    "experts 8-bit g64, attn fp16": ((8, 64), None),
    "experts 4-bit g64, attn fp16": ((4, 64), None),
    "experts 3-bit g64, attn fp16": ((3, 64), None),
    "experts 2-bit g16, attn fp16": ((2, 16), None),
    "experts fp16, attn 4-bit g64": (None, (4, 64)),
    "experts 8-bit g64, attn 4-bit g64": ((8, 64), (4, 64)),
    "experts 4-bit g64, attn 4-bit g64": ((4, 64), (4, 64)),
    "experts 3-bit g64, attn 4-bit g64": ((3, 64), (4, 64)),
    "experts 2-bit g16, attn 4-bit g64": ((2, 16), (4, 64)),
    # 3 bits with smaller groups (more scales): between 4-bit g64 and 3-bit g64 in size
    "experts 3-bit g32, attn fp16": ((3, 32), None),
    "experts 3-bit g16, attn fp16": ((3, 16), None),
    "experts 3-bit g32, attn 4-bit g64": ((3, 32), (4, 64)),
}


def _params(setting: tuple[int, int] | None, scale_group: int) -> dict[str, Any] | None:
    if setting is None:
        return None
    nbits, group = setting
    return {"weight_quant_params": {"nbits": nbits, "group_size": group, "axis": 1, "optimize": True},
            "scale_quant_params": {"nbits": 8, "group_size": scale_group},
            "zero_quant_params": {"nbits": 8, "group_size": None}}


def quant_config(name: str) -> QuantConfig:
    """The QuantConfig of a named configuration (8-bit meta as in the article: scale group 128 for
    experts, 256 for attention; one zero scale per tensor)."""
    experts, attn = CONFIGS[name]
    return QuantConfig(ffn_config=_params(experts, 128), attn_config=_params(attn, 256))


def _text_file() -> Path:
    import pydoc_data.topics  # a large stdlib text module, read only as sample text

    return Path(pydoc_data.topics.__file__)


def _key(name: str, n_tokens: int) -> str:
    text_hash = hashlib.sha256(_text_file().read_bytes()).hexdigest()[:12]
    turns = hashlib.sha256(repr(TURNS).encode()).hexdigest()[:8]
    return f"{name}|n={n_tokens}|answer={ANSWER_TOKENS}|turns={turns}|text={text_hash}|embedded={EMBEDDED_VERSION}"


def _cache_file() -> Path:
    return cache_root() / "quality" / "results.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------- measuring


def _checkpoint_bytes(folder: Path) -> dict[str, int]:
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["files"]
    experts = sum(size for name, size in files.items() if name.startswith("experts-"))
    attn = 0
    for key, entry in read_header(folder / "trunk.safetensors").items():
        if ".self_attn." in key:
            a, b = entry["data_offsets"]
            attn += b - a
    return {"expert_bytes": experts, "attn_bytes": attn, "total_bytes": sum(files.values()),
            "expert_blob_bytes": manifest["expert_format"]["blob_bytes"]}


@torch.no_grad()
def _perplexity(model: Any, tokenizer: Any, n_tokens: int) -> float:
    text = _text_file().read_text()[: 16 * n_tokens]  # plenty for n tokens; the whole file is ~170k tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"{_text_file()} gave only {len(ids)} tokens, {n_tokens} asked")
    x = torch.tensor([ids])
    logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])
    return float(math.exp(nll))


def measure(name: str, n_tokens: int = 256, keep_checkpoint: bool = False,
            offload_per_layer: int = 4) -> dict[str, Any]:
    """Quantize the embedded model with configuration ``name``, load it, and score it (see module doc)."""
    from transformers import AutoTokenizer  # heavy: the package import stays fast without it

    t0 = time.perf_counter()
    src = build_embedded()
    quant = quant_config(name)
    dst = cache_root() / "quality" / "checkpoints" / name.replace(", ", "_").replace(" ", "-")
    quantize(src, dst, quant, device="cpu", progress=False)
    quantize_s = time.perf_counter() - t0
    sizes = _checkpoint_bytes(dst)
    cfg = load_config(dst)
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    offload = OffloadConfig.for_model(L, E, offload_per_layer=offload_per_layer, buffer_size=2,
                                      prefetch=1 if offload_per_layer else 0)
    model = build_model("cpu", None, offload, dst)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ppl = _perplexity(model, tokenizer, n_tokens)
    session = ChatSession(model, tokenizer, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
    replies = [session.send(message) for message, _ in TURNS]
    experts, attn = CONFIGS[name]
    params_per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    row = {
        "name": name,
        "experts": "fp16" if experts is None else f"{experts[0]}-bit g{experts[1]}",
        "attention": "fp16" if attn is None else f"{attn[0]}-bit g{attn[1]}",
        **sizes,
        "expert_bits_per_param": round(8 * sizes["expert_blob_bytes"] / params_per_expert, 3),
        "perplexity": round(ppl, 3),
        "n_tokens": n_tokens,
        "paris": ANSWER in replies[0],
        "reply": replies[0],
        "follow_ups": all(word in r for (_, word), r in zip(TURNS, replies)),
        "replies": replies,
        "quantize_s": round(quantize_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    del model
    if not keep_checkpoint:
        shutil.rmtree(dst, ignore_errors=True)
    return row


def quality_table(configs: Iterable[str] | None = None, n_tokens: int = 256, use_cache: bool = True,
                  log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Perplexity and bytes of the embedded model for each configuration (default: all of ``CONFIGS``).

    Results are cached per configuration in ``<cache>/quality/results.json`` (keyed by the text's
    hash and the embedded model's version), so an interrupted run resumes and a repeated call is
    instant. Slow on CPU the first time: a few minutes per configuration.
    """
    names = list(configs) if configs is not None else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}: use names from mixtral_nb.quality.CONFIGS")
    cache_path = _cache_file()
    cache = _read_json(cache_path) if use_cache else {}
    rows = []
    for name in names:
        key = _key(name, n_tokens)
        if key not in cache:
            if log:
                log(f"measuring {name} ...")
            cache[key] = measure(name, n_tokens)
            if use_cache:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cache, indent=1))
                tmp.replace(cache_path)
            if log:
                r = cache[key]
                log(f"  {r['total_bytes'] / 1e6:.0f} MB, perplexity {r['perplexity']:.2f}, Paris: {r['paris']}, "
                    f"3 turns: {r['follow_ups']} {r['replies']} ({r['seconds']:.0f} s)")
        rows.append(cache[key])
    return rows


# ------------------------------------------------------------------------------- the precomputed file


def write_results(rows: list[dict[str, Any]], path: str | Path, command: str) -> Path:
    """Save a table with what produced it (date, command, versions) for ``load_results``."""
    path = Path(path)
    doc = {
        "date": datetime.date.today().isoformat(),
        "command": command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": "embedded SmolLM2-135M-Instruct upcycled to 8 experts/layer, top-2",
        "text": f"first {rows[0]['n_tokens'] if rows else '?'} tokens of CPython's pydoc_data/topics.py "
                "(Python version above), the model's own tokenizer",
        "question": QUESTION,
        "turns": [list(t) for t in TURNS],
        "answer_tokens": ANSWER_TOKENS,
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_results(path: str | Path | None = None) -> dict[str, Any]:
    """The precomputed table: ``path``, else ``quality_embedded.json`` next to the notebooks
    (the current folder, ``./notebooks``, the repo this package runs from, or ``./mixtral_nb/notebooks``,
    where the Colab install cell clones the repo)."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = [Path.cwd() / PRECOMPUTED, Path.cwd() / "notebooks" / PRECOMPUTED,
                      Path(__file__).resolve().parent.parent / "notebooks" / PRECOMPUTED,
                      Path.cwd() / "mixtral_nb" / "notebooks" / PRECOMPUTED]  # Colab: the clone in /content
    for p in candidates:
        if p.is_file():
            return json.loads(p.read_text())
    raise FileNotFoundError(f"no precomputed quality table at {', '.join(map(str, candidates))}: run "
                            "mixtral_nb.quality.quality_table() (slow on CPU) or pass the file's path")


def smallest_passing(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest configuration whose reply still names Paris."""
    ok = [r for r in rows if r.get("paris")]
    return min(ok, key=lambda r: r["total_bytes"]) if ok else None


def smallest_sensible(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest configuration that passes the whole multi-turn check (``TURNS``): the embedded
    model's default, since a chat's follow-ups are what a too-small setting gets wrong first."""
    ok = [r for r in rows if r.get("follow_ups")]
    return min(ok, key=lambda r: r["total_bytes"]) if ok else None


def _turns_cell(row: dict[str, Any]) -> str:
    """The three-turn result; a setting that misses Paris fails it (its first turn is that question),
    and a row measured before the check existed has none."""
    if "follow_ups" in row:
        return "yes" if row["follow_ups"] else "no"
    return "no" if not row["paris"] else "?"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table (sizes in MB = 1e6 bytes)."""
    head = f"{'experts':<12} {'attention':<11} {'bits/param':>10} {'experts MB':>10} {'attn MB':>8} {'total MB':>9} " \
           f"{'perplexity':>10}  Paris  3 turns"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['experts']:<12} {r['attention']:<11} {r['expert_bits_per_param']:>10.2f} "
                     f"{r['expert_bytes'] / 1e6:>10.1f} {r['attn_bytes'] / 1e6:>8.1f} {r['total_bytes'] / 1e6:>9.1f} "
                     f"{r['perplexity']:>10.2f}  {'yes' if r['paris'] else 'no':<5}  "
                     f"{_turns_cell(r)}")
    return "\n".join(lines)


def plot_quality(rows: list[dict[str, Any]]) -> Any:
    """Two bar charts side by side, one row per setting (largest first): checkpoint size, and
    perplexity (log scale) coloured by whether the reply still names Paris."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, and only the plots need it
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sorted(rows, key=lambda r: r["total_bytes"])
    labels = [f"experts {r['experts']}, attn {r['attention']}" for r in rows]
    fig = Figure(figsize=(9.0, 0.32 * len(rows) + 1.3), dpi=100)
    FigureCanvasAgg(fig)
    ax_size, ax_ppl = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 1.3]})
    y = range(len(rows))
    ax_size.barh(y, [r["total_bytes"] / 1e6 for r in rows], color="tab:gray")
    ax_size.set_yticks(list(y), labels, fontsize=7)
    ax_size.set_xlabel("checkpoint size (MB)", fontsize=8)
    colors = ["tab:green" if r["paris"] else "tab:red" for r in rows]
    ax_ppl.barh(y, [r["perplexity"] for r in rows], color=colors)
    ax_ppl.set_xscale("log")
    ax_ppl.set_xlabel("perplexity (log scale, lower is better)", fontsize=8)
    for i, r in enumerate(rows):
        ax_size.text(r["total_bytes"] / 1e6, i, f" {r['total_bytes'] / 1e6:.0f}", va="center", fontsize=6)
        ax_ppl.text(r["perplexity"], i, f" {r['perplexity']:.1f}", va="center", fontsize=6)
    ax_ppl.legend(handles=[Patch(color="tab:green", label="answers Paris"), Patch(color="tab:red", label="does not")],
                  fontsize=7, loc="upper right")
    for ax in (ax_size, ax_ppl):
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="x", linewidth=0.3, alpha=0.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle("Embedded model: quality vs size", fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------- cache behaviour per layer


class CacheProbe:
    """Per-layer expert-cache hits and misses, and bytes copied per token, recorded with forward hooks.

    ``with CacheProbe(model) as probe: session.send(...)``; then ``probe.layer_hit_rates()`` and
    ``probe.summary()``. Reads the cache's own counters before and after each layer's experts run
    (prefetches for the next layer count there, as prefetches, not here), so it adds no GPU sync.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = model.expert_cache
        self.layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
        n = len(self.layers)
        self.hits, self.misses = [0] * n, [0] * n
        self.tokens = self.decode_tokens = 0
        self.bytes_h2d = self.bytes_d2h = self.decode_bytes_h2d = 0
        self._handles: list[Any] = []
        self._before: dict[int, tuple[int, int]] = {}
        self._step: tuple[int, int, int] | None = None

    def _layer_pre(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self._before[i] = (self.cache.hits, self.cache.misses)
        return hook

    def _layer_post(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            h, m = self._before.pop(i, (self.cache.hits, self.cache.misses))
            self.hits[i] += self.cache.hits - h
            self.misses[i] += self.cache.misses - m
        return hook

    def _model_pre(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        t = int(ids.shape[-1]) if ids is not None else 0
        self._step = (t, self.cache.bytes_h2d, self.cache.bytes_d2h)

    def _model_post(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self._step is None:
            return
        t, h2d, d2h = self._step
        self._step = None
        self.tokens += t
        self.bytes_h2d += self.cache.bytes_h2d - h2d
        self.bytes_d2h += self.cache.bytes_d2h - d2h
        if t == 1:
            self.decode_tokens += 1
            self.decode_bytes_h2d += self.cache.bytes_h2d - h2d

    def __enter__(self) -> "CacheProbe":
        for i, m in enumerate(self.layers):
            self._handles.append(m.register_forward_pre_hook(self._layer_pre(i)))
            self._handles.append(m.register_forward_hook(self._layer_post(i)))
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def layer_hit_rates(self) -> list[float | None]:
        """Hit rate of each layer (None for a layer that was not used)."""
        return [h / (h + m) if h + m else None for h, m in zip(self.hits, self.misses)]

    def summary(self) -> dict[str, Any]:
        """Totals: tokens run, hit rate, bytes copied to the device per token (all, and decode only)."""
        hits, misses = sum(self.hits), sum(self.misses)
        return {
            "tokens": self.tokens, "decode_tokens": self.decode_tokens,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "h2d_bytes_per_token": self.bytes_h2d / self.tokens if self.tokens else None,
            "h2d_bytes_per_decode_token": self.decode_bytes_h2d / self.decode_tokens if self.decode_tokens else None,
            "d2h_bytes_per_token": self.bytes_d2h / self.tokens if self.tokens else None,
            "expert_blob_bytes": self.cache.blob_bytes,
        }


def plot_layer_hit_rates(probe: CacheProbe) -> Any:
    """A bar per layer: its expert-cache hit rate over the recorded run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, and only the plots need it
    from matplotlib.figure import Figure

    rates = probe.layer_hit_rates()
    fig = Figure(figsize=(9.0, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(range(len(rates)), [100 * (r or 0.0) for r in rates], color="tab:orange")
    ax.set_ylim(0, 105)
    ax.set_xlabel("layer")
    ax.set_ylabel("hit rate (%)")
    s = probe.summary()
    overall = "n/a" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.0f}%"
    ax.set_title(f"Expert-cache hit rate per layer (overall {overall}, {s['tokens']} tokens)", fontsize=9, loc="left")
    ax.grid(True, axis="y", linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral_nb.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write the table here (e.g. notebooks/quality_embedded.json)")
    p.add_argument("--n-tokens", type=int, default=256)
    p.add_argument("--config", action="append", default=None, help="a name from CONFIGS (repeatable; default all)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    rows = quality_table(args.config, n_tokens=args.n_tokens)
    print(format_table(rows))
    best = smallest_passing(rows)
    print(f"smallest configuration that still answers {ANSWER}: {best['name'] if best else 'none'}")
    best = smallest_sensible(rows)
    print(f"smallest configuration that passes all {len(TURNS)} turns: {best['name'] if best else 'none'}")
    if args.out:
        cmd = "python -m mixtral_nb.quality " + " ".join(sys.argv[1:] if argv is None else argv)
        print(f"wrote {write_results(rows, args.out, cmd.strip())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
