"""A cohort on Dask (issue 19): copies of the sample CT on a LocalCluster of two worker processes give the
single-process labels voxel for voxel; a corrupted file is recorded and the others finish; an interrupted
batch resumes with the missing volumes only; no partial file is left; bad input fails before any work."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed: pip install "
                                  "'fmoneshot[batch]'")

from conftest import REPO, SAMPLE  # noqa: E402

from FMOneShotLib import batch  # noqa: E402
from FMOneShotLib.cli import main  # noqa: E402
from FMOneShotLib.errors import FMOneShotError  # noqa: E402
from FMOneShotLib.files import PARTIAL, remove_partials  # noqa: E402
from FMOneShotLib.image import read_volume  # noqa: E402
from FMOneShotLib.metrics import dice  # noqa: E402
from FMOneShotLib.pipeline import OneShot  # noqa: E402
from FMOneShotLib.template import Template, sample_prompts  # noqa: E402

CT = SAMPLE / "images" / "ct-small.nii.gz"
MASK = SAMPLE / "masks" / "ct-small.nii.gz"
LABELS = {"liver": 5, "spleen": 1}


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of two worker processes for the module (it is slow to start on two cores)."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A saved template (liver and spleen painted on slice 20), copies of the CT, a corrupted file, a
    manifest giving one copy its reference mask, and the single-process labels of the CT."""
    root = tmp_path_factory.mktemp("cohort")
    ct, ref = read_volume(CT), read_volume(MASK).array
    z = 20
    parts = {n: sample_prompts(ref[z] == v, 5, 5, 0) for n, v in LABELS.items()}
    from FMOneShotLib.template import Label

    template = Template.from_volume(ct, z, {n: p for n, (p, _) in parts.items()},
                                    {n: q for n, (_, q) in parts.items()}, {n: ref[z] == v for n, v in LABELS.items()},
                                    labels=[Label(n, v) for n, v in LABELS.items()])
    template.save(root / "template.json")
    images = root / "images"
    images.mkdir()
    data = CT.read_bytes()
    for name in ("a", "b", "c", "d", "e"):
        (images / f"{name}.nii.gz").write_bytes(data)
    (images / "broken.nii.gz").write_bytes(np.random.default_rng(0).bytes(len(data)))  # not an image at all
    (root / "manifest.csv").write_text(f"id,image,mask\nc,images/c.nii.gz,{MASK}\nbroken,images/broken.nii.gz,\n",
                                       encoding="utf-8")
    single = OneShot(Template.load(root / "template.json")).fit().apply(ct).labels.array
    return {"root": root, "template": root / "template.json", "single": single, "reference": ref, "ct": ct}


def partials(folder):
    return sorted(p.name for p in folder.rglob(f"{PARTIAL}*"))


def manifest_rows(folder):
    with open(folder / "results.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_cohort_equals_the_single_process_run_and_a_failure_is_recorded(cohort, client, tmp_path):
    out = tmp_path / "out"
    inputs = [cohort["root"] / "images" / "a.nii.gz", cohort["root"] / "images" / "b.nii.gz",
              cohort["root"] / "manifest.csv"]
    report = batch.run(cohort["template"], inputs, out, client=client, progress=False)
    status = {r["id"]: r["status"] for r in report.rows}
    assert status == {"a": "ok", "b": "ok", "c": "ok", "broken": "failed"}
    broken = next(r for r in report.rows if r["id"] == "broken")
    assert "Cannot read" in broken["error"] and not (out / "broken-labels.nii.gz").exists()
    ct = cohort["ct"]
    for name in "abc":
        labels = read_volume(out / f"{name}-labels.nii.gz")
        assert np.array_equal(labels.array, cohort["single"]), name  # voxel for voxel
        assert np.allclose(labels.spacing, ct.spacing) and np.allclose(labels.origin, ct.origin, atol=1e-4)
    # the record and the manifest hold the numbers of the file written
    rows = manifest_rows(out)
    assert list(rows) == ["a", "b", "c", "broken"]
    voxel_ml = float(np.prod(ct.spacing)) / 1000
    record = json.loads((out / "c.result.json").read_text(encoding="utf-8"))
    for name, value in LABELS.items():
        mine = cohort["single"] == value
        assert record["labels"][name]["volume_ml"] == pytest.approx(mine.sum() * voxel_ml, abs=1e-3)
        assert float(rows["a"][f"{name}_ml"]) == pytest.approx(mine.sum() * voxel_ml, abs=1e-3)
        d = dice(mine, cohort["reference"] == value)
        assert record["labels"][name]["dice"] == pytest.approx(d, abs=1e-5)
        assert float(rows["c"][f"{name}_dice"]) == pytest.approx(d, abs=1e-5)
        found = [z for z in range(ct.n_slices) if mine[z].any()]
        assert record["labels"][name]["slices"] == found
    assert record["labels"]["liver"]["dice"] >= 0.75  # the painted template finds the liver in 3D
    assert rows["a"]["liver_dice"] == "" and rows["broken"]["status"] == "failed"
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["volumes"][3]["error"] == broken["error"]
    # fitted once: one worker trained the adapter, any other reused it; each built its models once
    reused = client.run(lambda: {d: e.adapter_reused for d, e in batch._ENGINES.items()})
    digest = record["digest"]
    assert sum(not r[digest] for r in reused.values() if digest in r) == 1
    assert all(b.get(digest, 0) <= 1 for b in client.run(lambda: dict(batch.BUILDS)).values())
    assert Template.load(out / "template.json").adapter is not None
    assert partials(out) == []

    # a rerun skips the finished volumes (files left unchanged) and tries the failed one again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*-labels.nii.gz")}
    again = batch.run(cohort["template"], inputs, out, client=client, progress=False)
    assert {r["id"]: r["status"] for r in again.rows} == {"a": "skipped", "b": "skipped", "c": "skipped",
                                                          "broken": "failed"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-labels.nii.gz")} == stamps
    assert manifest_rows(out)["c"]["liver_dice"] == rows["c"]["liver_dice"]

    # other settings into the same folder: refused before any work, nothing changed
    with pytest.raises(FMOneShotError, match="another template or other settings"):
        batch.run(cohort["template"], inputs, out, client=client, seed=1, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-labels.nii.gz")} == stamps
    # ... and with force every volume is computed again, with a template fitted again (seed 1)
    forced = batch.run(cohort["template"], inputs[:2], out, client=client, seed=1, force=True, progress=False)
    assert [r["status"] for r in forced.rows] == ["ok", "ok"]
    assert json.loads((out / "a.result.json").read_text(encoding="utf-8"))["digest"] != digest
    assert Template.load(out / "template.json").adapter["description"]["options"]["seed"] == 1


def test_interrupt_midway_then_rerun_completes_only_the_missing_volumes(cohort, client, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) stops `fmoneshot batch` on its own local
    cluster; the same command on the module's cluster (--scheduler) finishes the rest. Sixteen copies of the CT:
    with five, an idle machine finished the four after the first before the interrupt reached the batch."""
    out = tmp_path / "out"
    names = [f"v{i:02d}" for i in range(16)]
    (tmp_path / "images").mkdir()
    data = (cohort["root"] / "images" / "a.nii.gz").read_bytes()
    images = []
    for n in names:
        (tmp_path / "images" / f"{n}.nii.gz").write_bytes(data)
        images.append(str(tmp_path / "images" / f"{n}.nii.gz"))
    argv = ["batch", str(cohort["template"]), *images, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Ctrl-C as a terminal delivers it: the child starts with SIGINT's default disposition, whatever this process
    # inherited (an ignored SIGINT is inherited through exec, and then the batch never sees the Ctrl-C)
    proc = subprocess.Popen([sys.executable, "-m", "FMOneShotLib.cli", *argv, "--workers", "2"], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 400
        while not list(out.glob("*.result.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert partials(out) == []
    done = sorted(p.name.split(".")[0] for p in out.glob("*.result.json"))
    assert 1 <= len(done) < len(names), done
    for name in done:  # a finished volume is whole
        assert np.array_equal(read_volume(out / f"{name}-labels.nii.gz").array, cohort["single"])
    rows = manifest_rows(out)  # written on the way out: the finished ones ok, the rest not run
    assert {n for n, r in rows.items() if r["status"] == "ok"} == set(done)
    assert {r["status"] for n, r in rows.items() if n not in done} == {"not run"}
    stamps = {n: (out / f"{n}-labels.nii.gz").stat().st_mtime_ns for n in done}

    assert main([*argv, "--scheduler", client.scheduler_info()["address"]]) == 0
    rows = manifest_rows(out)
    assert {n for n, r in rows.items() if r["status"] == "skipped"} == set(done)
    assert {n for n, r in rows.items() if r["status"] == "ok"} == set(names) - set(done)
    assert {n: (out / f"{n}-labels.nii.gz").stat().st_mtime_ns for n in done} == stamps
    for name in names:
        assert np.array_equal(read_volume(out / f"{name}-labels.nii.gz").array, cohort["single"]), name
    assert partials(out) == []


def test_the_batch_command_counts_its_volumes_in_words(cohort, client, tmp_path, capsys):
    """One volume is "1 volume", two are "2 volumes" (it printed "1 volumes")."""
    images = cohort["root"] / "images"
    out, address = tmp_path / "out", client.scheduler_info()["address"]
    assert main(["batch", str(cohort["template"]), str(images / "a.nii.gz"), "--output", str(out),
                 "--scheduler", address]) == 0
    assert capsys.readouterr().out.startswith("fmoneshot batch: 1 volume: 1 done, 0 already done (skipped), 0 failed;")
    assert np.array_equal(read_volume(out / "a-labels.nii.gz").array, cohort["single"])
    assert main(["batch", str(cohort["template"]), str(images / "a.nii.gz"), str(images / "b.nii.gz"),
                 "--output", str(out), "--scheduler", address]) == 0
    assert capsys.readouterr().out.startswith("fmoneshot batch: 2 volumes: 1 done, 1 already done (skipped), 0 failed;")


def test_bad_input_fails_before_any_work(cohort, tmp_path):
    """No cluster is started (client=None would start one): every case fails while the inputs are checked."""
    images = cohort["root"] / "images"
    tpl = cohort["template"]
    with pytest.raises(FMOneShotError, match="Input not found"):
        batch.run(tpl, [images / "a.nii.gz", images / "nothing.nii.gz"], tmp_path / "o1")
    with pytest.raises(FMOneShotError, match="same id|the id"):
        batch.run(tpl, [images / "a.nii.gz", cohort["root"] / "images" / ".." / "images" / "a.nii.gz"], tmp_path / "o2")
    (tmp_path / "bad.csv").write_text("name,path\nx,images/a.nii.gz\n", encoding="utf-8")
    with pytest.raises(FMOneShotError, match="needs id and image"):
        batch.run(tpl, [tmp_path / "bad.csv"], tmp_path / "o3")
    (tmp_path / "slash.csv").write_text(f"id,image\nx/y,{images / 'a.nii.gz'}\n", encoding="utf-8")
    with pytest.raises(FMOneShotError, match="cannot name output files"):
        batch.run(tpl, [tmp_path / "slash.csv"], tmp_path / "o4")
    with pytest.raises(FMOneShotError, match="format"):
        batch.run(tpl, [images / "a.nii.gz"], tmp_path / "o5", format=".png")
    mine = tmp_path / "o6"
    mine.mkdir()
    (mine / "a-labels.nii.gz").write_text("a user's file", encoding="utf-8")
    with pytest.raises(FMOneShotError, match="already exist"):
        batch.run(tpl, [images / "a.nii.gz"], mine)
    assert (mine / "a-labels.nii.gz").read_text(encoding="utf-8") == "a user's file"
    assert not any((tmp_path / f"o{k}").exists() for k in (1, 2, 3, 4, 5))


def test_batch_command_bad_input_exit_code_2(cohort, tmp_path, capsys):
    tpl, image = cohort["template"], cohort["root"] / "images" / "a.nii.gz"
    assert main(["batch", str(tpl), str(tmp_path / "none.nii.gz"), "--output", str(tmp_path / "o")]) == 2
    assert "Input not found" in capsys.readouterr().err
    assert main(["batch", str(tpl), str(image), "--output", str(tmp_path / "o"), "--workers", "2",
                 "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "--workers sizes the local cluster" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "none.json"), str(image), "--output", str(tmp_path / "o")]) == 2
    assert "No template file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_template_digest_survives_files_and_sees_changes(cohort, tmp_path):
    tpl = Template.load(cohort["template"])
    tpl.save(tmp_path / "copy.json")
    assert Template.load(tmp_path / "copy.json").digest() == tpl.digest()
    moved = Template.load(cohort["template"])
    moved.slices[0].positive["liver"][0, 0] += 1
    assert moved.digest() != tpl.digest()
    repainted = Template.load(cohort["template"])
    repainted.slices[0].masks["spleen"][0, 0] ^= True
    assert repainted.digest() != tpl.digest()


def test_remove_partials_touches_only_atomic_temporaries(tmp_path):
    (tmp_path / f"{PARTIAL}123-a-labels.nii.gz").write_text("half", encoding="utf-8")
    (tmp_path / "a-labels.nii.gz").write_text("whole", encoding="utf-8")
    (tmp_path / "partial-notes.txt").write_text("a user's", encoding="utf-8")
    assert [p.name for p in remove_partials(tmp_path)] == [f"{PARTIAL}123-a-labels.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-labels.nii.gz", "partial-notes.txt"]


def test_manifest_lists_landmarks_in_mm_and_slice_ranges(cohort, tmp_path):
    """The manifest's numbers without a cluster: summarise one in-process result and write the manifest."""
    ct = cohort["ct"]
    template = Template.from_volume(ct, 12, positive={"liver": [[86, 49]]}, landmarks={"vertebra": [61, 75]})
    result = OneShot(template).fit().apply(ct)
    record = {"id": "ct", "image": str(CT), "mask": None, "status": "ok", "error": "", "seconds": 1.0,
              "labels_file": "ct-labels.nii.gz", **batch.summarise(result, ct)}
    best = result.best_landmarks()["vertebra"]
    assert record["landmarks"]["vertebra"]["mm"] == pytest.approx(list(ct.index_to_physical([*best.xy, best.slice])),
                                                                   abs=1e-3)
    batch._write_manifest(tmp_path, [record], "0" * 64)
    row = manifest_rows(tmp_path)["ct"]
    assert [float(row[f"vertebra_{a}_mm"]) for a in "xyz"] == pytest.approx(record["landmarks"]["vertebra"]["mm"])
    assert int(row["vertebra_slice"]) == best.slice == 12  # the template volume itself: its own slice wins
    found = record["labels"]["liver"]["slices"]
    assert row["liver_slices"] == batch._slice_ranges(found) and found
    assert batch._slice_ranges([3, 4, 5, 9, 11, 12]) == "3-5 9 11-12"
    assert "liver_dice" not in row  # no mask given, no Dice column


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_cluster_without_a_gpu_is_refused_before_starting():
    with pytest.raises(FMOneShotError, match="no CUDA GPU"):
        batch.local_cluster(gpu=True)
