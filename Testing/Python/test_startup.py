"""Start-up: --help, argument errors and one-line input errors answer without importing PyTorch (seconds
idle, tens of seconds on a loaded machine); each case runs in a fresh interpreter to see what it imported."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

CT = "Testing/Data/totalseg-ct-small/images/ct-small.nii.gz"

PROBE = """
import json, sys
from FMOneShotLib.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse: --help and argument errors
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def probe(*argv):
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout + p.stderr


@pytest.mark.parametrize("argv, code, message", [
    (["--help"], 0, "One-shot segmentation"),
    (["segment", "--help"], 0, "--positive NAME:X,Y"),
    (["bench", "--help"], 0, "--threads"),
    (["segment", CT], 2, "the following arguments are required: --output"),
    (["segment", CT, "--template-image", CT, "--slice", 24, "--positive", "liver:500,49", "--output", "x.nrrd"],
     2, "outside"),
    (["segment", "missing.nii.gz", "--template-image", CT, "--positive", "liver:86,49", "--output", "x.nrrd"],
     2, "Target not found: missing.nii.gz"),
    (["demo", "--labels", "no-such-organ"], 2, "no-such-organ"),
    (["eval", "no-such-dataset"], 2, "no-such-dataset"),
    (["bench", "--slices", 1], 2, "too small"),
    (["weights", "list"], 0, "cache:"),
])
def test_no_pytorch_before_it_is_needed(argv, code, message, tmp_path):
    result, output = probe(*argv)
    assert result["code"] == code, output
    assert message in output
    assert result["torch"] is False, output


def test_a_real_run_does_load_pytorch(tmp_path):
    """The probe sees PyTorch where it is needed (so the False above is not the probe's blindness)."""
    result, output = probe("bench", "--slices", 6, "--size", 64, "--naive-slices", 1)
    assert result == {"code": 0, "torch": True}, output


def test_the_command_lines_backend_names_are_the_registered_backends():
    from FMOneShotLib.features import available_backends
    from FMOneShotLib.weights import BACKENDS

    assert sorted(BACKENDS) == available_backends()
