"""Replaying a routing trace through a model of the expert cache, under several eviction policies and budgets.

Why: which policy and how many GPU slots per layer pay off depends on how the router really behaves;
replaying a recorded (or synthetic) :class:`~mixtral_nb.trace.Trace` answers it in milliseconds, and
Belady's offline optimum says how far any policy is from the best possible.

The model follows ``cache.ExpertCache`` without its streams: layer i owns ``slots[i]`` GPU slots, its
first ``slots[i]`` experts resident at the start; a step asks each layer for the distinct experts its
tokens chose, hits first; a miss may not evict an expert the same step still needs (when all resident
ones are needed, as a prefill chunk can, the ones already computed become evictable, as in
``OffloadedExperts.forward``). In host-mirror mode the host holds every expert and evictions copy
nothing. In swap mode each cache (one per GPU) holds its layers' offloaded experts plus
``buffer_size + extra_host_slots`` spare blobs; all but ``cache.HOST_RESERVE`` of them start as host
copies ("clean" residents) spread over the layers by ``cache.spread_clean``. Evicting a clean expert
copies nothing and the loaded expert keeps its own host copy (so a layer's clean count stays
constant); evicting one without a host copy writes it back (one D2H copy of one blob), and the loaded
expert then keeps its copy only while more than ``HOST_RESERVE`` blobs are free. Speculative prefetch
is not modelled: the misses are those of demand fetching.

Policies (victim among the evictable resident experts of the layer):

- ``lru``: the least recently used (the article's cache).
- ``clean_lru``: among the ``clean_window`` least recently used, a clean one first, else the least
  recently used (mixtral_nb's cache; the same as ``lru`` in host-mirror mode).
- ``lfu``: the one used least often since the start of the trace (ties: least recent).
- ``belady``: the one whose next use in this layer is furthest ahead (never: infinitely far; ties:
  clean, then least recent). It knows the future, so no policy misses less over a trace: the bound.
"""

from __future__ import annotations

import argparse
import bisect
import math
import numbers
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .cache import HOST_RESERVE, hits_first, spread_clean
from .chat import ChatSession
from .load import load
from .trace import Trace, record_routing, synthetic_trace

__all__ = ["POLICIES", "CacheModel", "SimResult", "distribute", "format_table", "policy_main", "policy_table",
           "simulate"]

POLICIES = ("lru", "lfu", "clean_lru", "belady")


def _int_tuple(value: Any, what: str, low: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        each = "GPU slots of each layer" if what == "gpu_slots" else "layers of each cache"
        raise ValueError(f"CacheModel.{what}={value!r}: give a non-empty sequence of integers ({each}) or None")
    for i, v in enumerate(value):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ValueError(f"CacheModel.{what}[{i}]={v!r}: give an integer >= {low}")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class CacheModel:
    """What the simulated cache is besides its policy (see the module docstring); the defaults are
    ``OffloadConfig``'s, in swap mode, with one cache for all layers."""

    mirror: bool = False  # True: the host holds every expert (evictions never write back)
    buffer_size: int = 4  # spare GPU buffers, and as many spare host blobs (swap mode)
    extra_host_slots: int = 0  # spare host blobs beyond buffer_size: host copies of resident experts (swap mode)
    clean_window: int = 3  # clean_lru: how far from the least recent end a clean expert may be picked
    gpu_slots: tuple[int, ...] | None = None  # the cache's own slots per layer: simulate's budget when given none
    parts: tuple[int, ...] | None = None  # layers of each cache, in order (a model split over GPUs); None: one

    def __post_init__(self) -> None:
        for name, low in (("buffer_size", 1), ("extra_host_slots", 0), ("clean_window", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"CacheModel.{name}={v!r}: give an integer >= {low}")
        if not isinstance(self.mirror, bool):
            raise ValueError(f"CacheModel.mirror={self.mirror!r}: give True (host mirror) or False (swap)")
        for name in ("gpu_slots", "parts"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _int_tuple(v, name, 1))
        if self.gpu_slots is not None and self.parts is not None and sum(self.parts) != len(self.gpu_slots):
            raise ValueError(f"CacheModel.parts={self.parts} covers {sum(self.parts)} layers, gpu_slots has "
                             f"{len(self.gpu_slots)}: give one count of layers per cache, summing to the layers")

    @property
    def spare_host_blobs(self) -> int:
        """Host blobs of one cache beyond its offloaded experts (swap mode; 0 in host-mirror mode)."""
        return 0 if self.mirror else self.buffer_size + self.extra_host_slots

    @classmethod
    def of(cls, model: Any) -> "CacheModel":
        """The settings of a built model's own expert cache (every GPU's, when split: their slots per
        layer and their separate host blobs), so a replay answers "what if this cache had another
        budget or policy"."""
        group = getattr(model, "expert_cache", None)
        if group is None:
            raise ValueError("CacheModel.of: the model has no expert cache: pass a model made by build_model or load")
        caches = list(getattr(group, "caches", [group]))
        if len({bool(cache.mirror) for cache in caches}) > 1:
            raise ValueError("CacheModel.of: the model's caches differ in host mode (mirror on one GPU, swap on "
                             "another), which the replay does not model: build it with host_mirror=True or False")
        c = caches[0].config
        slots = tuple(s for cache in caches for s in cache.layer_slots)
        parts = tuple(cache.L for cache in caches) if len(caches) > 1 else None
        out = cls(mirror=bool(caches[0].mirror), buffer_size=c.buffer_size, extra_host_slots=c.extra_host_slots,
                     clean_window=c.clean_window, gpu_slots=slots, parts=parts)
        for cache in caches:  # the host blobs each cache really has: the model above must count them alike
            offloaded = cache.L * cache.E if cache.mirror else sum(cache.E - s for s in cache.layer_slots)
            if len(cache.host) != offloaded + out.spare_host_blobs:
                raise ValueError(f"CacheModel.of: a cache holds {len(cache.host)} host blobs, the model expects "
                                 f"{offloaded + out.spare_host_blobs}: was the cache freed (a newer build)?")
        return out


@dataclass
class SimResult:
    """Counts from one replay. Hit rates count one use per expert per layer call, like ``CacheStats``."""

    policy: str
    slots: list[int]
    hits: int = 0
    misses: int = 0
    writebacks: int = 0
    decode_hits: int = 0
    decode_misses: int = 0
    decode_writebacks: int = 0
    tokens: int = 0
    decode_tokens: int = 0
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """Over every step, prefill included (the quantity Belady maximises)."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def decode_hit_rate(self) -> float | None:
        """Over one-token steps only (what decode speed depends on); None without any."""
        n = self.decode_hits + self.decode_misses
        return self.decode_hits / n if n else None

    @property
    def d2h_per_token(self) -> float | None:
        """Write-backs (blobs copied GPU to host) per decoded token; None without decoded tokens."""
        return self.decode_writebacks / self.decode_tokens if self.decode_tokens else None

    @property
    def h2d_per_token(self) -> float | None:
        """Misses (blobs copied host to GPU) per decoded token; None without decoded tokens."""
        return self.decode_misses / self.decode_tokens if self.decode_tokens else None

    def layer_miss_rates(self) -> list[float]:
        return [m / (h + m) if h + m else 0.0 for h, m in zip(self.layer_hits, self.layer_misses)]


def _slots_list(slots: int | Sequence[int], trace: Trace) -> list[int]:
    L, E = trace.num_layers, trace.num_experts
    if isinstance(slots, bool):
        raise ValueError(f"slots={slots!r}: give an integer or one integer per layer")
    out = [slots] * L if isinstance(slots, numbers.Integral) else list(slots)
    if len(out) != L:
        raise ValueError(f"slots has {len(out)} entries, the trace has {L} layers: give one per layer or one integer")
    for i, s in enumerate(out):
        if not isinstance(s, numbers.Integral) or isinstance(s, bool) or not 1 <= s <= E:
            raise ValueError(f"slots[{i}]={s!r}: every layer needs between 1 and {E} (num_experts) GPU slots")
    return [int(s) for s in out]


def simulate(trace: Trace, slots: int | Sequence[int] | None = None, policy: str = "clean_lru",
             cache: CacheModel | None = None) -> SimResult:
    """Replay ``trace`` with ``slots`` GPU slots per layer (one integer, one per layer, or None: the
    cache model's own ``gpu_slots``) under ``policy`` (one of :data:`POLICIES`); see the module
    docstring for the cache model."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: use one of {', '.join(POLICIES)}")
    if not isinstance(trace, Trace):
        raise ValueError(f"simulate needs a Trace, got {type(trace).__name__}")
    if trace.num_steps == 0:
        raise ValueError("the trace has no steps: record a conversation (or generate a synthetic trace) first")
    cache = cache or CacheModel()
    if slots is None:
        if cache.gpu_slots is None:
            raise ValueError("simulate: give slots (per layer, or one integer), or a CacheModel with gpu_slots "
                             "(CacheModel.of(model) reads a built model's)")
        slots = cache.gpu_slots
    per_layer = _slots_list(slots, trace)
    L, E = trace.num_layers, trace.num_experts
    parts = cache.parts or (L,)
    if sum(parts) != L:
        raise ValueError(f"CacheModel.parts={cache.parts} covers {sum(parts)} layers, the trace has {L}: "
                         "replay a trace of the same model")
    requests = trace.requests()
    window = 1 if policy == "lru" or cache.mirror else cache.clean_window
    future: list[list[list[int]]] = []
    if policy == "belady":  # per layer and expert, the steps that use it
        future = [[[] for _ in range(E)] for _ in range(L)]
        for s, step in enumerate(requests):
            for layer, need in enumerate(step):
                for e in need:
                    future[layer][e].append(s)

    resident: list[OrderedDict[int, None]] = [OrderedDict((e, None) for e in range(n)) for n in per_layer]
    # resident experts with a host copy: in swap mode each cache's spare blobs but HOST_RESERVE, spread as it does
    part_of: list[int] = []
    host_free: list[int] = []  # free host blobs of each cache
    clean: list[set[int]] = []
    start = 0
    for k, n in enumerate(parts):
        part_slots = per_layer[start:start + n]
        spread = [0] * n if cache.mirror else spread_clean(cache.spare_host_blobs - HOST_RESERVE, part_slots, E)
        clean += [set(range(s if cache.mirror else c)) for s, c in zip(part_slots, spread)]
        host_free.append(cache.spare_host_blobs - sum(spread))
        part_of += [k] * n
        start += n
    uses = [[0] * E for _ in range(L)]
    r = SimResult(policy, per_layer, layer_hits=[0] * L, layer_misses=[0] * L, tokens=trace.tokens,
                  decode_tokens=trace.decode_tokens)

    def victim(layer: int, protect: set[int], step: int) -> int | None:
        cands = [e for e in resident[layer] if e not in protect]  # least recent first
        if not cands:
            return None
        if policy == "lfu":
            u = uses[layer]
            return min(cands, key=lambda e: u[e])  # min keeps the first (least recent) of ties
        if policy == "belady":
            def next_use(e: int) -> float:
                f = future[layer][e]
                i = bisect.bisect_right(f, step)
                return f[i] if i < len(f) else math.inf
            return max(cands, key=lambda e: (next_use(e), e in clean[layer]))  # max keeps the first of ties
        for e in cands[:window]:
            if e in clean[layer]:
                return e
        return cands[0]

    for s, (prefill, step) in enumerate(zip(trace.prefill.tolist(), requests)):
        for layer, need in enumerate(step):
            res = resident[layer]
            order = hits_first(need, res)
            protect = set(need)
            crowded = False  # every resident expert was needed: from then on the computed ones are evictable
            hits = misses = wb = 0
            for i, e in enumerate(order):
                uses[layer][e] += 1
                if e in res:
                    res.move_to_end(e)
                    hits += 1
                    continue
                misses += 1
                out = None
                if len(res) >= per_layer[layer]:
                    out = None if crowded else victim(layer, protect, s)
                    if out is None:  # the experts before this one are computed first, then evictable
                        crowded = True
                        out = victim(layer, set(order[i:]), s)
                    assert out is not None
                # the cache keeps this expert's host copy unless a write-back is coming and needs the blob
                k = part_of[layer]
                if cache.mirror or (out is not None and out in clean[layer]) or host_free[k] > HOST_RESERVE:
                    clean[layer].add(e)
                else:
                    host_free[k] += 1  # given up: the expert now lives on the GPU only
                res[e] = None
                if out is not None:
                    del res[out]
                    if out in clean[layer]:  # its host copy is still there: nothing copied
                        clean[layer].discard(out)
                    else:  # written back into a free host blob
                        host_free[k] -= 1
                        wb += 1
                        assert host_free[k] >= 0
            r.layer_hits[layer] += hits
            r.layer_misses[layer] += misses
            r.hits, r.misses, r.writebacks = r.hits + hits, r.misses + misses, r.writebacks + wb
            if not prefill:
                r.decode_hits += hits
                r.decode_misses += misses
                r.decode_writebacks += wb
    return r


def distribute(total: int, num_layers: int, num_experts: int, miss_rates: Sequence[float] | None = None) -> list[int]:
    """``total`` GPU slots split over the layers: evenly (``miss_rates`` None; the first layers get the
    remainder), or each layer 1 plus a share of the rest proportional to its miss rate (largest
    remainders rounded up), never more than ``num_experts`` per layer."""
    if not isinstance(total, numbers.Integral) or isinstance(total, bool) or not num_layers <= total <= num_layers * num_experts:
        raise ValueError(f"total={total!r} slots: give an integer between {num_layers} (one per layer) and "
                         f"{num_layers * num_experts} (every expert resident)")
    if miss_rates is None or not any(w > 0 for w in miss_rates):
        base, extra = divmod(total, num_layers)
        return [base + (i < extra) for i in range(num_layers)]
    if len(miss_rates) != num_layers or any(not math.isfinite(w) or w < 0 for w in miss_rates):
        raise ValueError(f"miss_rates: give {num_layers} numbers >= 0, one per layer")
    out = [1] * num_layers
    left = total - num_layers
    while left > 0:  # water-filling: layers at num_experts drop out and their share goes to the others
        open_ = [i for i in range(num_layers) if out[i] < num_experts]
        weight = sum(miss_rates[i] for i in open_)
        shares = {i: (left * miss_rates[i] / weight if weight > 0 else left / len(open_)) for i in open_}
        given = 0
        for i in open_:
            add = min(int(shares[i]), num_experts - out[i])
            out[i] += add
            given += add
        left -= given
        if given == 0:  # hand out single slots by the largest remaining share
            for i in sorted(open_, key=lambda i: (-(shares[i] - int(shares[i])), -miss_rates[i], i)):
                if left == 0:
                    break
                if out[i] < num_experts:
                    out[i] += 1
                    left -= 1
    return out


def budget_slots(trace: Trace, total: int, how: str = "even", policy: str = "clean_lru",
                 cache: CacheModel | None = None) -> list[int]:
    """Per-layer slots for a total budget: ``even``, or ``miss`` (proportional to each layer's miss rate
    when the trace is replayed with the even split under ``policy``)."""
    if how not in ("even", "miss"):
        raise ValueError(f"how={how!r}: use even or miss")
    even = distribute(total, trace.num_layers, trace.num_experts)
    if how == "even":
        return even
    rates = simulate(trace, even, policy, cache).layer_miss_rates()
    return distribute(total, trace.num_layers, trace.num_experts, rates)


def policy_table(trace: Trace, slots: Sequence[int | Sequence[int] | None], policies: Sequence[str] = POLICIES,
                 cache: CacheModel | None = None) -> list[dict[str, Any]]:
    """One row per (budget, policy): the replay's hit rates, misses and copies per decoded token. A
    budget is slots per layer (one integer), one count per layer, or None (the cache model's own)."""
    budgets = list(slots)
    for budget in budgets:  # every budget checked before any replay
        if budget is not None:
            _slots_list(budget, trace)
    rows = []
    for budget in budgets:
        for policy in policies:
            r = simulate(trace, budget, policy, cache)
            per = r.slots
            rows.append({"policy": policy, "slots": per[0] if len(set(per)) == 1 else f"{sum(per)} total",
                         "hit_rate": r.hit_rate, "decode_hit_rate": r.decode_hit_rate, "misses": r.misses,
                         "h2d_per_token": r.h2d_per_token, "d2h_per_token": r.d2h_per_token})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`policy_table` rows (like llama-bench's)."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    head = ("policy", "slots/layer", "hit rate", "decode hit rate", "misses", "H2D/token", "D2H/token")
    body = [(r["policy"], str(r["slots"]), pct(r["hit_rate"]), pct(r["decode_hit_rate"]), str(r["misses"]),
             num(r["h2d_per_token"]), num(r["d2h_per_token"])) for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) + " |"
             for line in (head, *body)]
    lines.insert(1, "| " + " | ".join("-" * (w - 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + " |")
    return "\n".join(lines)


def plot_policies(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Hit rate against slots per layer, one line per policy (rows of uniform budgets)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, and only the plot needs it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["slots"], r["hit_rate"]) for r in rows if r["policy"] == policy and isinstance(r["slots"], int)]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=policy)
    ax.set_xlabel("GPU slots per layer")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 105)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=8)
    ax.set_title(title or "Expert-cache hit rate by budget and policy", fontsize=9, loc="left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- command line

SYNTHETIC_KEYS = {"p": ("repeat", float), "repeat": ("repeat", float), "zipf": ("zipf", float),
                  "tokens": ("tokens", int), "layers": ("num_layers", int), "experts": ("num_experts", int),
                  "k": ("top_k", int), "prefill": ("prefill", int), "seed": ("seed", int)}


def parse_synthetic(spec: str) -> dict[str, Any]:
    """``p=0.5,zipf=1,tokens=256,layers=32,experts=8,k=2,prefill=0,seed=0`` (any subset) as keyword arguments."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in SYNTHETIC_KEYS:
            raise ValueError(f"--synthetic {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(SYNTHETIC_KEYS)}")
        name, kind = SYNTHETIC_KEYS[key]
        try:
            out[name] = kind(value)
        except ValueError:
            raise ValueError(f"--synthetic {spec!r}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
    return out


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: give integers separated by commas, e.g. 2,4,6") from None
    if not values:
        raise ValueError(f"{what} {text!r}: give at least one integer")
    return values


def record_embedded(questions: Sequence[str], max_new_tokens: int = 32) -> Trace:
    """The embedded model's routing over a short chat on CPU (a real trace with text's locality)."""
    model, tok = load("embedded", device="cpu")
    session = ChatSession(model, tok, max_new_tokens=max_new_tokens)
    with record_routing(model) as rec:
        for q in questions:
            session.send(q)
    trace = rec.trace()
    return Trace(trace.ids, trace.step_tokens, trace.prefill, trace.num_experts,
                 f"embedded model, {len(questions)} chat turns")


DEFAULT_QUESTIONS = ("What is the capital of France?", "And what is it famous for?",
                     "Write a short poem about the sea.", "Explain what a mixture of experts is.")


def policy_main(argv: list[str] | None = None) -> int:
    """``python -m mixtral_nb policy``: a table of hit rate and copies per token by policy and budget."""
    p = argparse.ArgumentParser(prog="python -m mixtral_nb policy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="a trace file (.json or .npz) written by Trace.save or --save")
    src.add_argument("--synthetic", metavar="SPEC", help="a synthetic trace: p=REPEAT[,zipf=S,tokens=N,layers=L,"
                     "experts=E,k=K,prefill=N,seed=S], e.g. p=0.5")
    src.add_argument("--embedded", action="store_true", help="record the embedded model's routing over a few chat "
                     "turns on CPU (downloads nothing; minutes on a slow CPU)")
    p.add_argument("--slots", default=None, help="GPU slots per layer to try, comma-separated (none: 1 .. experts-1)")
    p.add_argument("--total", default=None, help="total GPU slots over all layers to try, comma-separated "
                   "(split by --distribute) instead of --slots")
    p.add_argument("--gpu-slots", default=None, metavar="S0,S1,...", help="one more budget: GPU slots of each "
                   "layer, one count per layer (like OffloadConfig.gpu_slots), tried alongside --slots or --total")
    p.add_argument("--distribute", choices=("even", "miss"), default="even",
                   help="how a --total is split: evenly, or by each layer's miss rate under the even split")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, from " + ", ".join(POLICIES))
    p.add_argument("--host", choices=("swap", "mirror"), default="swap",
                   help="swap: the host holds only the offloaded experts plus spares (Colab); mirror: every expert")
    p.add_argument("--buffer-size", type=int, default=CacheModel.buffer_size, help="spare GPU buffers (OffloadConfig)")
    p.add_argument("--extra-host-slots", type=int, default=CacheModel.extra_host_slots,
                   help="host blobs beyond the minimum, for clean copies (swap)")
    p.add_argument("--clean-window", type=int, default=CacheModel.clean_window, help="clean_lru's window")
    p.add_argument("--max-new-tokens", type=int, default=32, help="--embedded: tokens per reply")
    p.add_argument("--save", default=None, help="also write the trace to this .json or .npz file")
    args = p.parse_args(argv)
    try:
        policies = [x.strip() for x in args.policies.split(",") if x.strip()]
        bad = [x for x in policies if x not in POLICIES]
        if bad or not policies:
            raise ValueError(f"--policies {args.policies!r}: choose from {', '.join(POLICIES)}")
        cache = CacheModel(mirror=args.host == "mirror", buffer_size=args.buffer_size,
                           extra_host_slots=args.extra_host_slots, clean_window=args.clean_window)
        if args.slots is not None and args.total is not None:
            raise ValueError("give --slots or --total, not both")
        slots = _int_list(args.slots, "--slots") if args.slots else None
        own = _int_list(args.gpu_slots, "--gpu-slots") if args.gpu_slots else None
        totals = _int_list(args.total, "--total") if args.total else None
        if args.save and not args.save.endswith((".json", ".npz")):
            raise ValueError(f"--save {args.save!r}: a trace file ends in .json or .npz")
        if args.trace:
            trace = Trace.load(args.trace)
        elif args.synthetic is not None:
            trace = synthetic_trace(**parse_synthetic(args.synthetic))
        else:
            if args.max_new_tokens < 1:
                raise ValueError(f"--max-new-tokens {args.max_new_tokens}: give a whole number >= 1")
            trace = record_embedded(DEFAULT_QUESTIONS, args.max_new_tokens)
        if trace.num_steps == 0:
            raise ValueError("the trace has no steps")
        E = trace.num_experts
        for s in slots or ():
            if not 1 <= s <= E:
                raise ValueError(f"--slots {s}: give between 1 and {E} (the trace's experts per layer)")
        if totals is not None:
            budgets: list[Any] = [budget_slots(trace, t, args.distribute, "clean_lru", cache) for t in totals]
        else:
            budgets = slots or ([] if own else list(range(1, E)))
        if own is not None:
            if len(own) != trace.num_layers:
                raise ValueError(f"--gpu-slots has {len(own)} counts, the trace has {trace.num_layers} layers: "
                                 "give one per layer")
            bad_s = [s for s in own if not 1 <= s <= E]
            if bad_s:
                raise ValueError(f"--gpu-slots {bad_s[0]}: every layer needs between 1 and {E} (the trace's "
                                 "experts per layer)")
            budgets.append(own)
        if args.save:
            print(f"wrote {trace.save(args.save)}")
        print(f"{trace!r}; host {args.host}, buffer_size={cache.buffer_size}, extra_host_slots="
              f"{cache.extra_host_slots} ({cache.spare_host_blobs} spare host blobs), clean_window={cache.clean_window}")
        print(format_table(policy_table(trace, budgets, policies, cache)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

