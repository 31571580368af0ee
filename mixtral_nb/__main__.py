"""Command line: ``python -m mixtral_nb {demo,chat,bench,rehearse,quantize,plan,notebooks,check-notebooks}``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .load import load

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
            session.stop()
        print()
        print(f"[{session.last_stats.get('tok_s', 0):.1f} tok/s]", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .load import load

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
        from .notebook_tools import execute_to_html

        out = execute_to_html(Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb", Path(args.html))
        print(f"executed walkthrough written to {out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .checkpoint import quantize
    from .config import article_quant_config

    out = quantize(args.src, args.dst, article_quant_config())
    print(f"wrote {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .planner import detect

    print(detect().explain())
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    from .notebook_tools import execute_to_html

    root = Path(__file__).resolve().parent.parent / "notebooks"
    for nb in sorted(root.glob("*.ipynb")):
        print(execute_to_html(nb, Path("artifacts") / (nb.stem + ".html")))
    return 0


def _check_notebooks(args: argparse.Namespace) -> int:
    from .notebook_tools import dirty_notebooks

    bad = dirty_notebooks(Path(__file__).resolve().parent.parent / "notebooks")
    for p in bad:
        print(f"{p}: committed with outputs; strip them (`nbstripout {p}`); expected outputs of NBVAL_CHECK_OUTPUT "
              "cells belong in notebooks/nbval_expected.json")
    return 1 if bad else 0


def _nbval_prepare(args: argparse.Namespace) -> int:
    from .notebook_tools import prepare_for_nbval

    for p in prepare_for_nbval(Path(__file__).resolve().parent.parent / "notebooks", Path(args.dst)):
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "rehearse":
        from .rehearse import rehearse_main

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
