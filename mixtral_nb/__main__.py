"""Command line: ``python -m mixtral_nb {demo,chat,bench,rehearse,quantize,verify,synthetic,plan,notebooks,check-notebooks}``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .bench import bench_main
from .chat import ChatSession
from .checkpoint import CheckpointError, ProjectCheckpoint, quantize, verify
from .checkpoint.integrity import workers
from .config import article_quant_config
from .load import load
from .notebook_tools import dirty_notebooks, execute_to_html, prepare_for_nbval
from .planner import detect
from .rehearse import rehearse_main
from .synthetic import write_article_checkpoint, write_hf_checkpoint


def _chat(args: argparse.Namespace) -> int:
    model, tok = load(args.model, device=args.device)
    session = ChatSession(model, tok, system_prompt=args.system, max_new_tokens=args.max_new_tokens)
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
    for layer in range(ck.config.num_hidden_layers):
        for e in range(ck.config.num_local_experts):
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


def _plan(args: argparse.Namespace) -> int:
    print(detect().explain())
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
    p = argparse.ArgumentParser(prog="python -m mixtral_nb", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("chat", help="answer one --prompt, or chat in the terminal")
    c.add_argument("--model", default="auto", help="embedded, a local folder, a hub id, or auto (Mixtral on a GPU)")
    c.add_argument("--prompt", default=None)
    c.add_argument("--system", default=None)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--device", default=None)
    c.set_defaults(fn=_chat)
    d = sub.add_parser("demo", help="the embedded model end to end (what `make demo` runs)")
    d.add_argument("--html", default=None, help="also execute notebooks/walkthrough.ipynb and write it as HTML here")
    d.add_argument("--device", default=None)
    d.set_defaults(fn=_demo)
    q = sub.add_parser("quantize", help="original HF Mixtral folder or hub id -> project checkpoint")
    q.add_argument("src")
    q.add_argument("dst")
    q.set_defaults(fn=_quantize)
    sy = sub.add_parser("synthetic", help="write a full-size Mixtral-8x7B checkpoint of random values (rehearsals)")
    sy.add_argument("--layout", choices=("article", "hf"), default="article",
                    help="article: the article's pre-quantized hqq files; hf: the original fp16 shards")
    sy.add_argument("dst")
    sy.add_argument("--layers", type=int, default=None, help="write only the first N layers")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(fn=_synthetic)
    v = sub.add_parser("verify", help="check a checkpoint folder's files against their recorded digests")
    v.add_argument("path")
    v.add_argument("--time", action="store_true", help="print bytes hashed, seconds and GB/s")
    v.add_argument("--time-load", action="store_true", help="also time reading every weight without verification")
    v.set_defaults(fn=_verify)
    sub.add_parser("plan", help="print the memory plan for this machine").set_defaults(fn=_plan)
    sub.add_parser("bench", help="benchmark (see `bench --help`)")
    sub.add_parser("rehearse", help="the Colab journey at Mixtral size within Colab's limits (see `rehearse --help`)")
    sub.add_parser("notebooks", help="execute every notebook to artifacts/*.html").set_defaults(fn=_notebooks)
    sub.add_parser("check-notebooks", help="fail if a notebook has outputs").set_defaults(fn=_check_notebooks)
    nv = sub.add_parser("nbval-prepare", help="copy the notebooks with their expected check outputs, for nbval")
    nv.add_argument("dst")
    nv.set_defaults(fn=_nbval_prepare)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
