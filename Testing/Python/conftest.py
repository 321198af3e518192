"""Shared fixtures. Data in ../shared/data is read in place: a test that needs it skips with the reason in a
user's clone, and fails when CI=true, where its absence is a broken setup rather than a user's choice."""

import os
import sys
from pathlib import Path

import pytest

# The suite's models are the real architectures made small, and its images are small: every forward here is
# small work in the sense of FMOneShotLib.threads, which one thread serves best. On two threads, PyTorch's and
# OpenMP's workers spin against any other process on the machine (issue 20: the suite took 49 minutes instead
# of 4 on a loaded 2-core machine). Set before PyTorch is imported, so that the CLI tests' subprocesses inherit it;
# a value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("FMONESHOT_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE = REPO / "Testing" / "Data" / "totalseg-ct-small"
sys.path.insert(0, str(REPO))


def require_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "dataset.json").is_file():
        reason = (f"evaluation data {path} not found: clone beside a 'shared' folder with data/{name}, "
                  f"or set FMONESHOT_SHARED_DATA")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def require_package(module: str, install: str) -> None:
    """Skip (fail when CI=true, whose .ci/run installs it) where an optional package is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        reason = f"the optional package {module} is not installed ({install})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def chaos():
    return require_shared("chaos-mr-t2")


@pytest.fixture
def ceph():
    return require_shared("ceph-xray")


@pytest.fixture
def sample():
    return SAMPLE


@pytest.fixture(autouse=True, scope="session")
def empty_weights_cache(tmp_path_factory):
    """The tests never see the user's checkpoint cache: with SAM weights there, 'auto' would pick SAM and
    the offline figures the tests assert would change. Tests that need a cache set their own."""
    saved = os.environ.get("FMONESHOT_CACHE")
    os.environ["FMONESHOT_CACHE"] = str(tmp_path_factory.mktemp("weights-cache"))
    yield
    if saved is None:
        os.environ.pop("FMONESHOT_CACHE", None)
    else:
        os.environ["FMONESHOT_CACHE"] = saved
