"""Command line: ``python -m mixtral_nb COMMAND`` (demo, chat, bench, rehearse, policy, quantize, verify, synthetic,
plan, notebooks, check-notebooks, nbval-prepare)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .bench import bench_main
from .chat import ChatSession
from .build import parse_devices
from .checkpoint import CheckpointError, ProjectCheckpoint, quantize, verify
from .checkpoint.errors import HubError
from .checkpoint.integrity import workers
from .checkpoint.quantize import looks_like_repo_id
from .config import article_quant_config
from .families import family_of, skeleton
from .known_models import KNOWN_MODELS, model_config, param_count
from .load import load
from .notebook_tools import dirty_notebooks, execute_to_html, prepare_for_nbval
from .planner import PRESETS, Machine, MemoryPlanError, ModelSizes, Plan, detect
from .policy import policy_main
from .rehearse import rehearse_main
from .synthetic import write_article_checkpoint, write_hf_checkpoint
from .units import fmt_bytes

MODEL_WORDS = ("auto", "embedded")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one ``--help`` away) and defaults shown in every option's help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or -5 new tokens would still generate, or silently nothing)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give a whole number >= 1") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not >= 1: give a whole number >= 1")
    return n


def _float_in(lo: float, hi: float | None, lo_open: bool, what: str):
    """argparse type: a float in [lo, hi] (``lo_open``: lo itself excluded)."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: {what}") from None
        if not math.isfinite(x) or (x <= lo if lo_open else x < lo) or (hi is not None and x > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {what}")
        return x

    return parse


def check_model_name(name: str) -> None:
    """Refuse a --model that is neither a keyword, a folder nor hub-shaped, before anything loads."""
    if name in MODEL_WORDS or Path(name).exists() or looks_like_repo_id(name):
        return
    raise ValueError(f"--model {name!r} is neither auto, embedded, an existing folder nor a hub id (owner/name)")


def check_device(device: str | None) -> None:
    """Refuse a --device this machine lacks (``cuda`` without CUDA, ``gpu0``) before anything loads."""
    if device is None:
        return
    try:
        parse_devices(device)
    except ValueError as e:
        raise ValueError(f"--device: {e}") from None


def _load(name: str, device: str | None):
    """load() with a hub error that also says no folder of that name exists (a mistyped path looks like a hub id)."""
    try:
        return load(name, device=device)
    except HubError as e:
        if name in MODEL_WORDS:
            raise
        raise HubError(f"{e} (and there is no folder {name!r} here)") from e


def _chat(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    check_device(args.device)
    model, tok = _load(args.model, args.device)
    session = ChatSession(model, tok, system_prompt=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    prompts = [args.prompt] if args.prompt else None
    if prompts is None:
        print("mixtral_nb chat: type a message, empty line or Ctrl-D to quit.")
    while True:
        if prompts is not None:
            if not prompts:
                break
            text = prompts.pop(0)
            print(f"> {text}")
        else:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
        try:
            for piece in session.stream(text):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            session.stop()  # the partial reply stays in the conversation
        except ValueError as exc:  # a message or setting the session refuses; nothing was changed
            print(f"error: {exc}", file=sys.stderr)
            continue
        print()
        if session.last_stats:
            print(f"[{session.last_stats.get('tok_s', 0):.1f} tok/s]", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    check_device(args.device)
    t0 = time.perf_counter()
    model, tok = load("embedded", device=args.device)
    print(f"loaded the embedded model in {time.perf_counter() - t0:.1f} s")
    session = ChatSession(model, tok, max_new_tokens=48)
    for q in ("What is the capital of France?", "And what is it famous for?"):
        print(f"\n> {q}")
        for piece in session.stream(q):
            print(piece, end="", flush=True)
        print(f"\n[{session.last_stats['tok_s']:.1f} tok/s]")
    stats = model.expert_cache.stats()
    print("\nexpert cache:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    if args.html:
        out = execute_to_html(Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb", Path(args.html))
        print(f"executed walkthrough written to {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    out = quantize(args.src, args.dst, article_quant_config())
    print(f"wrote {out}")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    write = write_article_checkpoint if args.layout == "article" else write_hf_checkpoint
    try:
        out = write(args.dst, num_layers=args.layers, seed=args.seed, progress=True)
    except (CheckpointError, ValueError) as e:
        print(f"mixtral_nb synthetic: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _read_all(path: str) -> tuple[int, float]:
    """Open a project folder without digest checks and read every tensor and blob into RAM, as a
    host-mirror build_model does; returns (bytes, seconds)."""
    t0 = time.perf_counter()
    ck = ProjectCheckpoint(Path(path), verify=False)
    n = sum(t.numel() * t.element_size() for _, t in ck.trunk())
    sk = skeleton(ck.config)
    for layer in sk.moe_layers:
        for e in range(sk.num_experts):
            n += ck.blob(layer, e).clone().numel()
    ck.files.close()
    return n, time.perf_counter() - t0


def _verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.path)
    except CheckpointError as e:
        print(f"{args.path}: {e}")
        return 1
    for name, state in report.files.items():
        print(f"{name}: {'OK' if state == 'ok' else state.upper()}")
    if report.note:
        print(report.note)
    if args.time and report.bytes:
        print(f"verified {report.bytes / 1e9:.3f} GB in {report.seconds:.2f} s: {report.bytes / 1e9 / report.seconds:.2f} GB/s "
              f"({workers()} hashing threads)")
    if args.time_load and report.ok and report.kind == "project":
        n, load_s = _read_all(args.path)
        print(f"load without verification (every tensor and blob read into RAM): {n / 1e9:.3f} GB in {load_s:.2f} s; "
              f"verification adds {report.seconds:.2f} s = {100 * report.seconds / load_s:.1f} % of that load. Both runs "
              "after the first read from the page cache when it holds the files: drop it between runs for cold numbers")
    return 0 if report.ok else 1


def plan_table(machines: dict[str, Machine], context: int = 4096, model: Any = "mixtral-8x7b") -> str:
    """One row per machine: the plan's settings and expected memory, or why no plan fits (no traceback).
    ``model``: what ``planner.plan`` takes (a name, a config, a ModelSizes)."""
    head = ("preset", "machine", "offload_per_layer", "experts in RAM", "GPU (per GPU)", "host RAM", "fits")
    rows = []
    for name, m in machines.items():
        try:
            p = m.plan(context=context, model=model)
        except MemoryPlanError as e:
            rows.append((name, m.description, "-", "-", "-", "-", f"no plan: {e}"))
            continue
        if p.device == "cpu":
            mode = "all (CPU run)"
        elif p.offload_per_layer == 0:
            mode = "none needed"
        else:
            mode = "host mirror" if p.host_mirror else "swap"
        rows.append((name, m.description, str(p.offload_per_layer), mode, fmt_bytes(p.gpu_bytes), fmt_bytes(p.host_bytes),
                     "yes"))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in (head, *rows))


TABLE_ORDER = ("colab-t4", "kaggle-2xt4", "12gb", "24gb", "a100-40gb", "a100-80gb", "cpu")  # the free machines first


def _plan_cell(p: Plan) -> str:
    """A plan in a few characters: GPU slots of all routed experts, then spare host blobs or 'mirror'."""
    if p.device == "cpu":
        return "yes"
    if p.offload_per_layer == 0:
        return "all on GPU"
    total = p.sizes.num_layers * p.sizes.num_experts
    return f"{sum(p.layer_slots())}/{total} " + ("mirror" if p.host_mirror else f"+{p.extra_host_slots * p.num_gpus}")


MODELS_LEGEND = ("GB: the quantized checkpoint on disk (routed experts + everything resident). A machine's cell: GPU "
                 "slots / routed experts in all, then +N spare host blobs (swap mode: host RAM holds the offloaded "
                 "experts plus N copies of GPU-resident ones) or 'mirror' (host RAM holds every expert); 'no': no plan "
                 "fits (`plan --model NAME --all` says why); cpu: the whole model in RAM.")


def models_table(models: dict[str, Any], machines: dict[str, Machine], context: int = 4096) -> str:
    """The planner's verdict for every model on every machine, one row per model (a markdown table, as
    llama-bench prints): parameters, experts, bits (experts/attention), GB on disk, then one cell per machine."""
    quant = article_quant_config()
    head = ["model", "params", "routed experts", "bits e/a", "GB", *machines]
    rows = []
    for name, config in models.items():
        sizes = ModelSizes.of(config, quant)
        sk = skeleton(config)
        disk = sizes.num_layers * sizes.num_experts * sizes.expert_bytes + sizes.trunk_bytes
        row = [name, f"{param_count(config) / 1e9:.1f}B", f"{sizes.num_layers} x {sizes.num_experts}, top-{sk.top_k}",
               f"{quant.ffn['nbits']}/{quant.attn['nbits']}", f"{disk / 1e9:.1f}"]
        for m in machines.values():
            try:
                row.append(_plan_cell(m.plan(context=context, model=sizes)))
            except MemoryPlanError:
                row.append("no")
        rows.append(row)
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    right = {1, 4}  # numbers

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def plan_model(name: str) -> Any:
    """--model of `plan`: a known model's or a folder's transformers config (one clear error otherwise)."""
    if name in KNOWN_MODELS or (Path(name) / "config.json").is_file():
        return model_config(name)
    raise ValueError(f"--model {name!r} is not a known model ({', '.join(KNOWN_MODELS)}), 'all', or a folder with a "
                     "config.json")


def _plan(args: argparse.Namespace) -> int:
    names = sorted(PRESETS) if args.all or (args.model == "all" and not args.preset) else [args.preset]
    if args.model == "all":
        models = {n: model_config(n) for n in KNOWN_MODELS}
        names = sorted(names, key=lambda n: TABLE_ORDER.index(n) if n in TABLE_ORDER else len(TABLE_ORDER))
        print(models_table(models, {n: PRESETS[n] for n in names}, context=args.context))
        print(MODELS_LEGEND)
        return 0
    config = plan_model(args.model)
    sizes = ModelSizes.of(config)
    if args.model != "mixtral-8x7b":
        print(f"# {args.model}: {family_of(config).architecture}, {sizes.num_layers} MoE layers x {sizes.num_experts} "
              f"routed experts of {sizes.expert_bytes / 1e6:.1f} MB")
    if args.all or args.preset:
        print(plan_table({n: PRESETS[n] for n in names}, context=args.context, model=sizes))
        return 0
    print(detect(context=args.context, model=sizes).explain())
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent / "notebooks"
    for nb in sorted(root.glob("*.ipynb")):
        print(execute_to_html(nb, Path("artifacts") / (nb.stem + ".html")))
    return 0


def _check_notebooks(args: argparse.Namespace) -> int:
    bad = dirty_notebooks(Path(__file__).resolve().parent.parent / "notebooks")
    for p in bad:
        print(f"{p}: committed with outputs; strip them (`nbstripout {p}`); expected outputs of NBVAL_CHECK_OUTPUT "
              "cells belong in notebooks/nbval_expected.json")
    return 1 if bad else 0


def _nbval_prepare(args: argparse.Namespace) -> int:
    for p in prepare_for_nbval(Path(__file__).resolve().parent.parent / "notebooks", Path(args.dst)):
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    if argv and argv[0] == "rehearse":
        return rehearse_main(argv[1:])
    if argv and argv[0] == "policy":
        return policy_main(argv[1:])
    p = _Parser(prog="python -m mixtral_nb", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    c = sub.add_parser("chat", help="answer one --prompt, or chat in the terminal")
    c.add_argument("--model", default="auto",
                   help="auto (Mixtral with a GPU, else embedded), embedded, a local folder, or a hub id owner/name")
    c.add_argument("--prompt", default=None, help="answer this one message and exit (none: chat in the terminal)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=_positive_int, default=256, help="most tokens per reply (>= 1)")
    c.add_argument("--temperature", type=_float_in(0.0, None, False, "give a number >= 0 (0: greedy)"), default=0.0,
                   help="sampling temperature; 0 is greedy (always the likeliest token)")
    c.add_argument("--top-p", type=_float_in(0.0, 1.0, True, "give a number in (0, 1]"), default=1.0,
                   help="nucleus sampling: sample among the likeliest tokens whose probabilities add up to this "
                        "(used when --temperature > 0)")
    c.add_argument("--device", default=None, help="cpu, cuda or cuda:N (none: the GPU if there is one, else cpu)")
    c.set_defaults(fn=_chat)
    d = sub.add_parser("demo", help="the embedded model end to end (what `make demo` runs)")
    d.add_argument("--html", default=None, help="also execute notebooks/walkthrough.ipynb and write it as HTML here")
    d.add_argument("--device", default=None, help="cpu, cuda or cuda:N (none: the GPU if there is one, else cpu)")
    d.set_defaults(fn=_demo)
    q = sub.add_parser("quantize", help="original HF Mixtral folder or hub id -> project checkpoint")
    q.add_argument("src", help="original fp16 Mixtral folder, or its hub id owner/name")
    q.add_argument("dst", help="folder to write the quantized project checkpoint to")
    q.set_defaults(fn=_quantize)
    sy = sub.add_parser("synthetic", help="write a full-size Mixtral-8x7B checkpoint of random values (rehearsals)")
    sy.add_argument("--layout", choices=("article", "hf"), default="article",
                    help="article: the article's pre-quantized hqq files; hf: the original fp16 shards")
    sy.add_argument("dst", help="folder to write")
    sy.add_argument("--layers", type=_positive_int, default=None, help="write only the first N layers (none: all)")
    sy.add_argument("--seed", type=int, default=0, help="random seed of the values")
    sy.set_defaults(fn=_synthetic)
    v = sub.add_parser("verify", help="check a checkpoint folder's files against their recorded digests")
    v.add_argument("path", help="checkpoint folder")
    v.add_argument("--time", action="store_true", help="print bytes hashed, seconds and GB/s")
    v.add_argument("--time-load", action="store_true", help="also time reading every weight without verification")
    v.set_defaults(fn=_verify)
    pl = sub.add_parser("plan", help="print the memory plan for this machine, or a table for the preset machines")
    which = pl.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="the plan of this preset machine instead of this one, as a table row")
    which.add_argument("--all", action="store_true", help="a table of the plans of every preset machine")
    pl.add_argument("--model", default="mixtral-8x7b",
                    help=f"the model to plan for: one of {', '.join(KNOWN_MODELS)}, a folder holding its config.json, "
                         "or all (one table: every known model on every preset, or on --preset)")
    pl.add_argument("--context", type=_positive_int, default=4096, help="tokens of KV cache to plan for")
    pl.set_defaults(fn=_plan)
    sub.add_parser("bench", help="benchmark (see `bench --help`)")
    sub.add_parser("rehearse", help="the Colab journey at Mixtral size within Colab's limits (see `rehearse --help`)")
    sub.add_parser("policy", help="expert-cache hit rate by policy and budget on a routing trace (see `policy --help`)")
    sub.add_parser("notebooks", help="execute every notebook to artifacts/*.html").set_defaults(fn=_notebooks)
    sub.add_parser("check-notebooks", help="fail if a notebook has outputs").set_defaults(fn=_check_notebooks)
    nv = sub.add_parser("nbval-prepare", help="copy the notebooks with their expected check outputs, for nbval")
    nv.add_argument("dst", help="folder to copy the notebooks to")
    nv.set_defaults(fn=_nbval_prepare)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, CheckpointError) as e:  # bad input or a machine that cannot do it: one line, no traceback
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
