"""Re-measure docs/results.md's "Every dataset and adapter" tables on this machine (issue 20).

Runs ``fmoneshot eval`` (``FMOneShotLib.evaluate.evaluate``, offline backend and refiner, seed 0, every default
as the command has it) for each dataset and adapter, and prints each table in the Markdown of docs/results.md,
headed by the machine, PyTorch, the commit and the load average, so that a table says where it comes from.
Quality figures do not depend on the machine's load; the seconds do, and are printed beside the load average.

    python3 Testing/Benchmarks/results_tables.py                      # every dataset and adapter (long)
    python3 Testing/Benchmarks/results_tables.py --datasets hc18-us --adapters none classification
    python3 Testing/Benchmarks/results_tables.py --json results.json  # the summaries as well

Datasets are looked up in ../shared/data beside the repository, and the bundled sample CT in Testing/Data
(evaluated on its liver, spleen and kidneys, as docs/results.md says). A benchmark script: it prints figures and
asserts nothing (the quality floors are asserted by Testing/Python/test_quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from under_load import cpu_model  # noqa: E402  (same folder)

SHARED = REPO.parent / "shared" / "data"
DATASETS = {  # name -> (folder, labels to evaluate or None for all)
    "totalseg-ct-small": (REPO / "Testing" / "Data" / "totalseg-ct-small",
                          ["liver", "spleen", "kidney_right", "kidney_left"]),
    "chaos-mr-t2": (SHARED / "chaos-mr-t2", None),
    "hc18-us": (SHARED / "hc18-us", None),
    "ceph-xray": (SHARED / "ceph-xray", None),
}
# (adapter, augment): the rows of docs/results.md's tables, in its order
ADAPTERS = {"none": ("none", False), "basic": ("basic", False), "classification": ("classification", False),
            "contrastive": ("contrastive", False), "basic+augment": ("basic", True),
            "classification+augment": ("classification", True), "contrastive+augment": ("contrastive", True)}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def row(key: str, s: dict) -> str:
    """One Markdown table row of an evaluation summary."""
    if s["task"] == "landmarks":
        px = [v["px"] for v in s["landmarks"].values() if v["px"] is not None]
        mean_px = sum(px) / len(px) if px else None
        return (f"| {key.replace('+', ' --')} | **{_f(s['mean_ned'])}** | {_pct(s['within_10px'])} | "
                f"{_f(mean_px, 0)} | {s['align']['kind']} | {s['seconds']:.0f} |")
    labels = s["labels"]
    dice = " | ".join(_f(v["dice"]) for v in labels.values())
    empty = " / ".join(_pct(v["empty_slice_accuracy"]) for v in labels.values())
    acc = [(v["acc_pos"], v["acc_neg"]) for v in labels.values() if v["acc_pos"] is not None]
    accs = (f"{sum(a for a, _ in acc) / len(acc):.2f} / {sum(b for _, b in acc) / len(acc):.2f}" if acc else "–")
    return (f"| {key.replace('+', ' --')} | {dice} | **{_f(s['mean_dice'])}** | {empty} | {accs} | "
            f"{s['align']['kind']} | {s['seconds']:.0f} |")


def header(s: dict) -> str:
    if s["task"] == "landmarks":
        cols = ["adapter", "mean NED", "within 10 px", "mean distance (px)", "align", "seconds"]
    else:
        cols = ["adapter", *s["labels"], "mean Dice", "empty slices left empty", "Acc+ / Acc-", "align", "seconds"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    p.add_argument("--json", type=Path, help="also write every summary to this JSON file (must not exist)")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        p.error(f"{args.json} exists; choose a new file name")
    missing = [d for d in args.datasets if not DATASETS[d][0].is_dir()]
    if missing:
        p.error(f"not found: {', '.join(str(DATASETS[d][0]) for d in missing)} (../shared/data beside the clone)")
    import torch

    from FMOneShotLib.evaluate import evaluate

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; PyTorch {torch.__version__} on "
          f"{torch.get_num_threads()} threads; commit {commit}; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    out = {}
    for name in args.datasets:
        folder, labels = DATASETS[name]
        print(f"\n### {name}\n", flush=True)
        first = True
        for key in args.adapters:
            adapter, augment = ADAPTERS[key]
            load = os.getloadavg()[0]
            t = time.perf_counter()
            summary, _ = evaluate(folder, labels=labels, adapter=adapter,
                                  adapter_options={"augment": True} if augment else None)
            if first:
                print(header(summary))
                first = False
            print(row(key, summary) + f" <!-- load {load:.1f}, {time.perf_counter() - t:.0f} s -->", flush=True)
            out[f"{name}/{key}"] = summary
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
