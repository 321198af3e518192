"""fp32 against bf16 autocast for the forwards of the bench (d2s14 features, SAM 2 Hiera-T, SAM ViT-B) on this CPU.

Same inputs (slices of the bench volume), same batch, same threads; each forward warmed up once, then timed
``--repeats`` times, fp32 and bf16 in turn, the median kept (wall clock and the process's CPU time: on a
shared machine the CPU time at ``--threads 1`` is the steadier measure of the work). Agreement of bf16 with
fp32: cosine similarity of the feature vectors (per cell, then the mean and the 1st percentile), and for
d2s14 the share of the template's positive points whose whole-slice correspondence (argmax of cosine
similarity) lands on the same cell; for SAM 2 / SAM the IoU of the masks that the same prompts give. Random
weights (the cost of pretrained ones; the agreement of pretrained features is not measured here).

    PYTHONPATH=$PWD python3 Testing/Benchmarks/precision_cpu.py [--models d2s14,sam2,sam] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def timed(fns: dict, repeats: int) -> dict:
    """Each of ``fns`` (name -> callable) once to warm up, then ``repeats`` rounds of all of them in turn (so
    that a load from other processes that comes and goes falls on all of them alike). Per name: the median
    wall-clock and CPU seconds (the process's, all threads), and the last output."""
    for fn in fns.values():
        fn()  # warm-up (oneDNN primitives, allocations)
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    out = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            out[k] = fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: {"wall_s": round(statistics.median(wall[k]), 3), "cpu_s": round(statistics.median(cpu[k]), 3),
                "wall_times": [round(x, 3) for x in wall[k]], "output": out[k]} for k in fns}


def cosine_stats(a, b):
    a = a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1]).float()
    b = b.flatten(2).transpose(1, 2).reshape(-1, b.shape[1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"mean": round(float(cos.mean()), 5), "p01": round(float(cos.quantile(0.01)), 5),
            "min": round(float(cos.min()), 5)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="d2s14,sam2,sam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from FMOneShotLib.bench import BENCH_LABEL, bench_volume
    from FMOneShotLib.datasets import load_dataset
    from FMOneShotLib.demo import SAMPLE
    from FMOneShotLib.image import intensity_window, normalize
    from FMOneShotLib.template import sample_prompts

    vol, ref = bench_volume(100, 512)
    value = load_dataset(SAMPLE).label_value(BENCH_LABEL)
    z0 = int(np.argmax((ref == value).sum(axis=(1, 2))))
    window = intensity_window(vol, "CT")
    picks = list(range(z0 - args.batch // 2, z0 - args.batch // 2 + args.batch))
    images = normalize(vol.array[picks], window).astype(np.float32)
    pos, neg = sample_prompts(ref[z0] == value, 5, 5, 0)
    report = {"threads": args.threads, "batch": args.batch, "slices": picks}
    for name in args.models.split(","):
        if name == "d2s14":
            from FMOneShotLib.features import create_extractor
            from FMOneShotLib.features.base import sample_features

            extractors = {p: create_extractor("d2s14", weights="random", precision=p, batch_size=args.batch)
                          for p in ("fp32", "bf16")}
            res = timed({p: (lambda e=e: e.extract(images)) for p, e in extractors.items()}, args.repeats)
            a, b = res["fp32"].pop("output"), res["bf16"].pop("output")
            out = {p: {**r, "wall_per_slice_s": round(r["wall_s"] / len(images), 3)} for p, r in res.items()}
            out["cosine"] = cosine_stats(a, b)
            # whole-slice correspondences of the positive points of the middle slice, on every slice
            q32 = sample_features(a[len(images) // 2], pos, images.shape[1:])
            q16 = sample_features(b[len(images) // 2], pos, images.shape[1:])
            same = total = 0
            for k in range(len(images)):
                s32 = torch.einsum("nc,chw->nhw", torch.nn.functional.normalize(q32, dim=1),
                                   torch.nn.functional.normalize(a[k], dim=0)).flatten(1).argmax(1)
                s16 = torch.einsum("nc,chw->nhw", torch.nn.functional.normalize(q16, dim=1),
                                   torch.nn.functional.normalize(b[k], dim=0)).flatten(1).argmax(1)
                same += int((s32 == s16).sum())
                total += len(s32)
            out["same_argmax_cell"] = round(same / total, 3)
            report["d2s14"] = out
        elif name in ("sam2", "sam"):
            from FMOneShotLib.segmenters import create_segmenter

            kind = {"sam2": {"model": "tiny"}, "sam": {"model": "vit_b"}}[name]
            image = images[len(images) // 2]
            segs = {p: create_segmenter(name, weights="random", precision=p, **kind) for p in ("fp32", "bf16")}

            def encode(seg):
                seg.forget_encoding()
                seg._encode(image)
                return (seg.predictor._features["image_embed"] if name == "sam2" else seg.predictor.features).clone()

            res = timed({p: (lambda s=s: encode(s)) for p, s in segs.items()}, args.repeats)
            feats = {p: res[p].pop("output") for p in res}
            masks = {p: segs[p].segment(image, None, pos, neg) for p in segs}
            out = dict(res)
            out["cosine"] = cosine_stats(feats["fp32"], feats["bf16"])
            inter = (masks["fp32"] & masks["bf16"]).sum()
            union = (masks["fp32"] | masks["bf16"]).sum()
            out["mask_iou"] = round(float(inter / union), 4) if union else None
            report[name] = out
        print(json.dumps({name: report.get(name)}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
