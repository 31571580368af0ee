"""What first-load checksum verification costs build_model on a full-size converted folder.

    python scripts/verify_cost.py /tmp/synth        # writes the synthetic article folder there if missing

Times build_model at the colab-t4 plan with a cold page cache (dropped before each cold build: needs
root) and a warm one: first open (no VERIFIED marker: config and headers checked at open, the trunk and
each expert blob against read-time sums as the build reads them), and no verification, each twice
(cold builds vary by a few seconds). Also times the explicit blake2b pass of `verify`.
BENCHMARKS.md records the results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

from mixtral_nb import planner
from mixtral_nb.build import build_model, release_model
from mixtral_nb.checkpoint import ensure_converted
from mixtral_nb.synthetic import write_article_checkpoint

RUNS = [("cold_first_open", None, True), ("cold_no_verify", False, True), ("warm_first_open", None, False),
        ("warm_no_verify", False, False), ("cold_first_open_again", None, True), ("cold_no_verify_again", False, True),
        ("warm_first_open_again", None, False), ("warm_no_verify_again", False, False)]


def drop_page_cache() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the synthetic article folder (written if missing)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--json", help="write the timings here")
    ap.add_argument("--once", action="store_true", help="each kind of build once (the first four runs)")
    args = ap.parse_args()
    conv = ensure_converted(write_article_checkpoint(args.folder), progress=False)
    oc = planner.preset("colab-t4", context=4096).offload_config()
    out = {}
    for name, verify, cold in RUNS[:4] if args.once else RUNS:
        if verify is None:
            (conv / "VERIFIED").unlink(missing_ok=True)  # a first open
        if cold:
            drop_page_cache()
        torch.cuda.synchronize()
        t = time.perf_counter()
        model = build_model(args.device, None, oc, conv, verify=verify)
        torch.cuda.synchronize()
        out[f"{name}_s"] = round(time.perf_counter() - t, 2)
        release_model(model)
        del model
        print(name, out[f"{name}_s"], flush=True)
    drop_page_cache()
    from mixtral_nb.checkpoint import ProjectCheckpoint

    run = ProjectCheckpoint(conv, verify=False).check_digests()
    out["verify_blake2b_cold_s"] = round(run.seconds, 2)
    out["folder_gb"] = round(run.bytes / 1e9, 2)
    print("verify_blake2b_cold", out["verify_blake2b_cold_s"], "s for", out["folder_gb"], "GB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
