"""Execute notebooks/walkthrough.ipynb against a local model folder, its chat widget driven from code,
and report each cell's wall time and the kernel's peak memory; exit 1 on any cell error.

    python scripts/rehearse_notebook.py FOLDER [--device cuda:0] [--new-tokens 128] [--vram-cap-mib 15095]
        [--json OUT.json] [--executed OUT.ipynb]

(`python -m mixtral_nb rehearse --notebook` runs the same after its own stages.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mixtral_nb.rehearse import (GB, MiB, NOTEBOOK_PACKAGES, MemoryWatch, Recorder, RehearsalError,  # noqa: E402
                                 format_table, rehearse_notebook)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--vram-cap-mib", type=float, default=15095)
    p.add_argument("--host-limit-gb", type=float, default=11.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--executed", type=Path, default=None, help="write the executed notebook here")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    cap = int(a.vram_cap_mib * MiB) if dev.type == "cuda" else None
    watch = MemoryWatch(dev, a.host_limit_gb * GB, cap)
    watch.children_only = True  # the kernel process is what Colab would run
    rec = Recorder(watch, lambda: [])
    report: dict = {"packages": list(NOTEBOOK_PACKAGES)}
    code = 0
    watch.start()
    try:
        with rec.stage("notebook") as st:
            st.info = rehearse_notebook(a.folder, device=a.device, new_tokens=a.new_tokens,
                                        vram_cap_mib=a.vram_cap_mib if cap is not None else None, out=a.executed)
    except RehearsalError as e:
        report["error"], code = str(e), (2 if "crossed" in str(e) else 1)
    finally:
        watch.stop()
    report["stages"] = [s.to_json() for s in rec.stages]
    print(format_table(rec.stages))
    for c in (rec.stages[0].info or {}).get("cells", []):
        print(f"cell {c['cell']:>3} {c['wall_s'] or 0:8.2f} s  {c['first_line']}")
    if a.json is not None:
        a.json.write_text(json.dumps(report, indent=1, default=str))
    if code:
        print(f"rehearse_notebook: FAILED: {report['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
