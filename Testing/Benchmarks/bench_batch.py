"""Throughput of ``fmoneshot batch``: volumes per minute on local clusters of 1 and of 2 workers (or the
counts given), for the same cohort of copies of the sample CT, and the ratio.

    PYTHONPATH=. python3 Testing/Benchmarks/bench_batch.py [--volumes 8] [--workers 1 2] [--threads N]
        [--backend offline] [--weights random] [--json FILE]

Each run starts its own LocalCluster (start-up timed apart), then ``batch.run`` into a fresh folder: the
template is fitted once on a worker, every worker builds its models once, every volume is written. Volumes
per minute = volumes / the run's wall time (fit and model loading included, as a user sees them; the
cluster's start-up excluded). The template is liver and spleen painted on slice 20 of the sample CT.
Threads per worker default to cores // workers, as ``fmoneshot batch`` chooses them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from FMOneShotLib import batch  # noqa: E402
from FMOneShotLib.demo import SAMPLE  # noqa: E402
from FMOneShotLib.image import read_volume  # noqa: E402
from FMOneShotLib.template import Label, Template, sample_prompts  # noqa: E402

LABELS = {"liver": 5, "spleen": 1}


def make_cohort(folder: Path, n: int) -> tuple:
    ct_path = SAMPLE / "images" / "ct-small.nii.gz"
    ct, ref = read_volume(ct_path), read_volume(SAMPLE / "masks" / "ct-small.nii.gz").array
    z = 20
    parts = {k: sample_prompts(ref[z] == v, 5, 5, 0) for k, v in LABELS.items()}
    template = Template.from_volume(ct, z, {k: p for k, (p, _) in parts.items()},
                                    {k: q for k, (_, q) in parts.items()}, {k: ref[z] == v for k, v in LABELS.items()},
                                    labels=[Label(k, v) for k, v in LABELS.items()])
    data = ct_path.read_bytes()
    inputs = []
    for k in range(n):
        path = folder / f"volume{k:03d}.nii.gz"
        path.write_bytes(data)
        inputs.append(path)
    return template, inputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, help="PyTorch threads per worker (default: cores // workers)")
    p.add_argument("--backend", default="offline")
    p.add_argument("--weights", help="backend weights (random: a real architecture, randomly initialised)")
    p.add_argument("--segmenter", default="offline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    from distributed import Client

    options = {"device": args.device} if args.backend != "offline" else {}
    if args.weights:
        options["weights"] = args.weights
    figures = {"volumes": args.volumes, "backend": args.backend, "segmenter": args.segmenter, "cores": batch._cores(),
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        template, inputs = make_cohort(Path(tmp), args.volumes)
        for n in args.workers:
            t0 = time.perf_counter()
            cluster, threads = batch.local_cluster(n, args.threads, gpu=args.device.startswith("cuda"))
            client = Client(cluster)
            start = time.perf_counter() - t0
            try:
                t0 = time.perf_counter()
                report = batch.run(template, inputs, Path(tmp) / f"out-{n}", client=client, backend=args.backend,
                                   backend_options=options, segmenter=args.segmenter, threads=threads,
                                   progress=False)
                seconds = time.perf_counter() - t0
            finally:
                client.close()
                cluster.close()
            ok = report.count("ok")
            if ok != args.volumes:
                print(f"{args.volumes - ok} volumes failed: {[r['error'] for r in report.rows if r['error']]}")
                return 1
            per_volume = sorted(r["seconds"] for r in report.rows)
            run = {"workers": n, "threads_per_worker": threads, "cluster_start_s": round(start, 2),
                   "run_s": round(seconds, 2), "volumes_per_minute": round(ok * 60 / seconds, 2),
                   "median_volume_s": per_volume[len(per_volume) // 2]}
            figures["runs"].append(run)
            print(f"{n} worker(s) x {threads} thread(s): {run['volumes_per_minute']:.2f} volumes/min "
                  f"({ok} volumes in {seconds:.1f} s; cluster start {start:.1f} s; median "
                  f"{run['median_volume_s']:.2f} s per volume in a task)", flush=True)
    base = figures["runs"][0]["volumes_per_minute"]
    for run in figures["runs"][1:]:
        run["ratio"] = round(run["volumes_per_minute"] / base, 3)
        print(f"ratio {run['workers']} / {figures['runs'][0]['workers']} worker(s): {run['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
