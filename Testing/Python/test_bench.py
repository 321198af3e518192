"""The benchmark's figures on a small volume: the volume it builds, stages that add up, the JSON read back.
(Speed itself is printed by `fmoneshot bench`, never asserted by a timed test.)"""

import json

import numpy as np
import pytest

from FMOneShotLib.bench import bench_volume
from FMOneShotLib.cli import main
from FMOneShotLib.errors import FMOneShotError


def test_bench_volume_is_the_sample_ct_resampled():
    vol, labels = bench_volume(10, 64)
    assert vol.array.shape == (10, 64, 64) and labels.shape == (10, 64, 64)
    # the physical extent is the sample CT's: 30 slices of 3 mm
    assert vol.spacing[2] == pytest.approx(30 * 3.0 / 10)
    assert 0 < (labels == 4).any(axis=(1, 2)).sum() < 10  # the gallbladder lies on some slices, not all
    assert vol.array.min() < -500  # still Hounsfield units
    with pytest.raises(FMOneShotError, match="too small"):
        bench_volume(1, 64)


def test_bench_command_reports_consistent_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--slices", "6", "--size", "64", "--naive-slices", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["volume"]["slices"] == 6 and r["volume"]["size"] == [64, 64]
    _, labels = bench_volume(6, 64)
    assert r["volume"]["slices_with_structure"] == int((labels == 4).any(axis=(1, 2)).sum())
    stages = r["seconds"]
    parts = sum(stages[k] for k in ("io", "fit", "features", "adapter", "correspondence", "segmenter"))
    assert 0 < parts <= stages["total"] + 0.01
    assert r["model_forwards_seconds"] == pytest.approx(stages["features"], abs=1e-3)
    assert r["naive"]["slices_measured"] == 2
    assert r["speedup_over_naive"] == pytest.approx(r["naive"]["extrapolated_total"] / stages["total"], rel=0.02)
    assert r["peak_memory_mb"] > 100
    # the fit's parts add up to it; the load average beside the figures (none only without os.getloadavg)
    assert sum(r["fit_seconds"].values()) == pytest.approx(stages["fit"], abs=2e-3)
    assert set(r["load_average"]) == {"start", "after_chain", "after_naive"}
    assert all(v is None or v >= 0 for v in r["load_average"].values())
    printed = capsys.readouterr().out
    assert "speed-up" in printed and f"{stages['total']:.2f} s" in printed
    assert "load average (1 min)" in printed and "naive per slice" in printed
