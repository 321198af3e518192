"""The thread policy (FMOneShotLib.threads): small-tensor work on one PyTorch thread, model forwards on the
process's threads or --threads, and the caller's thread count back afterwards. The speed it buys is printed
by Testing/Benchmarks/under_load.py, never timed here."""

import json

import numpy as np
import pytest
import torch

from FMOneShotLib import adapters, threads
from FMOneShotLib.cli import main
from FMOneShotLib.datasets import load_dataset
from FMOneShotLib.demo import SAMPLE
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.features import vit
from FMOneShotLib.pipeline import OneShot
from FMOneShotLib.template import Template, sample_prompts

SMALL_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2}


@pytest.fixture
def three_threads():
    """The caller runs PyTorch on 3 threads (more than the policy's 1, whatever the machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)
    threads.set_model_threads(None)


def test_contexts_set_and_restore(three_threads):
    with threads.small_work():
        assert torch.get_num_threads() == threads.SMALL_WORK_THREADS == 1
        with threads.model_forward():
            assert torch.get_num_threads() == 3  # the caller's count, not the small work's
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    threads.set_model_threads(2)
    with threads.small_work(), threads.model_forward():
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3
    with pytest.raises(FMOneShotError, match="at least 1 thread"):
        threads.set_model_threads(0)


def test_the_registration_alone_runs_on_one_itk_thread_and_the_callers_count_is_restored(monkeypatch):
    """ITK's process-wide default thread count (which other modules in Slicer's process share) is 1 while the
    align stage's registration runs, and the caller's everywhere else in the chain: in the fit, around the
    registration within the apply, and after it."""
    import SimpleITK as sitk

    from FMOneShotLib import pipeline

    seen = {"register": [], "localise": []}
    execute = sitk.ImageRegistrationMethod.Execute
    localise = pipeline.OneShot.localise

    def spy_execute(self, *a, **k):
        seen["register"].append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        return execute(self, *a, **k)

    def spy_localise(self, *a, **k):
        seen["localise"].append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        return localise(self, *a, **k)

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "Execute", spy_execute)
    monkeypatch.setattr(pipeline.OneShot, "localise", spy_localise)
    case = load_dataset(SAMPLE).cases[0]
    vol, ref = case.read_image(), case.read_mask()
    z = int(np.argmax((ref == 5).sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z] == 5, 3, 3, 0)
    tpl = Template.from_volume(vol, z, {"liver": pos}, {"liver": neg})
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
    try:
        OneShot(tpl, segmenter="offline", adapter="none", align="affine").fit().apply(vol, slices=[z])
        assert seen["register"] == [1] and seen["localise"] == [3]
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def test_the_chain_trains_on_one_thread_and_runs_forwards_on_the_callers(three_threads, monkeypatch):
    seen = {"train": set(), "forward": set()}
    train = adapters.train_adam
    forward = vit.TimmViTFeatures.forward

    def spy_train(*a, **k):
        seen["train"].add(torch.get_num_threads())
        return train(*a, **k)

    def spy_forward(self, x):
        seen["forward"].add(torch.get_num_threads())
        return forward(self, x)

    monkeypatch.setattr(adapters, "train_adam", spy_train)
    monkeypatch.setattr(vit.TimmViTFeatures, "forward", spy_forward)
    case = load_dataset(SAMPLE).cases[0]
    vol, ref = case.read_image(), case.read_mask()
    z = int(np.argmax((ref == 5).sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z] == 5, 3, 3, 0)
    tpl = Template.from_volume(vol, z, {"liver": pos}, {"liver": neg}, {"liver": ref[z] == 5})
    engine = OneShot(tpl, backend="d2s14", segmenter="none", backend_options={
        "weights": "random", "overrides": SMALL_VIT, "precision": "fp32", "device": "cpu", "input_size": 112}).fit()
    engine.apply(vol, slices=[z])
    assert seen == {"train": {1}, "forward": {3}}
    assert torch.get_num_threads() == 3


def test_bench_prints_and_records_the_threads(three_threads, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--slices", "6", "--size", "64", "--naive-slices", "1", "--threads", "2",
                 "--json", str(out)]) == 0
    assert "threads: 2 for model forwards, 1 for small-tensor work" in capsys.readouterr().out
    assert json.loads(out.read_text(encoding="utf-8"))["threads"] == {"model_forwards": 2, "small_work": 1}
    assert torch.get_num_threads() == 3 and threads.model_threads() == 3  # --threads ends with the bench
