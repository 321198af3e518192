"""fp32 against bf16 autocast for the forwards of the bench (d2s14 features, SAM 2 Hiera-T, SAM ViT-B) on this CPU.

Same inputs (slices of the bench volume), same batch, same threads; each forward timed ``--repeats`` times
after one warm-up, the median kept. Agreement of bf16 with fp32: cosine similarity of the feature vectors
(per cell, then the mean and the 1st percentile), and for d2s14 the share of the template's positive points
whose whole-slice correspondence (argmax of cosine similarity) lands on the same cell; for SAM 2 / SAM the
IoU of the masks that the same prompts give. Random weights (the cost of pretrained ones).

    PYTHONPATH=$PWD python3 Testing/Benchmarks/precision_cpu.py [--models d2s14,sam2,sam] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats):
    fn()  # warm-up (oneDNN primitives, allocations)
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


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

            out = {}
            feats = {}
            for precision in ("fp32", "bf16"):
                ex = create_extractor("d2s14", weights="random", precision=precision, batch_size=args.batch)
                med, times, f = timed(lambda: ex.extract(images), args.repeats)
                out[precision] = {"median_s": round(med, 3), "per_slice_s": round(med / len(images), 3),
                                  "times": [round(t, 3) for t in times]}
                feats[precision] = f
            a, b = feats["fp32"], feats["bf16"]
            out["cosine"] = cosine_stats(a, b)
            # whole-slice correspondences of the positive points of the middle slice, on every slice
            q32 = sample_features(a[len(images) // 2], pos, images.shape[1:])
            q16 = sample_features(b[len(images) // 2], pos, images.shape[1:])
            same = 0
            total = 0
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
            out, masks, feats = {}, {}, {}
            for precision in ("fp32", "bf16"):
                seg = create_segmenter(name, weights="random", precision=precision, **kind)
                image = images[len(images) // 2]

                def encode():
                    seg.forget_encoding()
                    seg._encode(image)
                    if name == "sam2":
                        return seg.predictor._features["image_embed"].clone()
                    return seg.predictor.features.clone()

                med, times, f = timed(encode, args.repeats)
                t = time.perf_counter()
                m = seg.segment(image, None, pos, neg)
                predict = time.perf_counter() - t
                out[precision] = {"encode_median_s": round(med, 3), "times": [round(x, 3) for x in times],
                                  "predict_s": round(predict, 3)}
                masks[precision], feats[precision] = m, f
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
