"""What the user gets back (issue 20): which value is which label, said and written beside the labels in a
file Slicer reads; slice counts of the plane that was processed; the adapter that ran; one colour key in
every picture; every file the demo wrote; the template's files written alike."""

import json
import stat

import numpy as np
import pytest
import SimpleITK as sitk

from FMOneShotLib.cli import main
from FMOneShotLib.evaluate import evaluate
from FMOneShotLib.image import read_volume
from FMOneShotLib.template import Label, color_table_path, sample_prompts, write_color_table
from FMOneShotLib.viz import FOUND_LANDMARK_COLOR, REFERENCE_COLOR

from test_evaluate import make_landmark_dataset

CT = "Testing/Data/totalseg-ct-small/images/ct-small.nii.gz"
MASK = "Testing/Data/totalseg-ct-small/masks/ct-small.nii.gz"


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)


def read_color_table(path) -> dict:
    """value -> (name, RGBA 0-255) as Slicer's colour-table storage node reads ``path``."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    node, storage = slicer.vtkMRMLColorTableNode(), slicer.vtkMRMLColorTableStorageNode()
    scene.AddNode(node)
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    out = {}
    for v in range(node.GetNumberOfColors()):
        if node.GetColorName(v):
            rgba = [0.0] * 4
            node.GetColor(v, rgba)
            out[v] = (node.GetColorName(v), tuple(round(255 * c) for c in rgba))
    return out


def test_color_table_names_paths_and_refusal(tmp_path):
    assert color_table_path(tmp_path / "ct-labels.nii.gz") == tmp_path / "ct-labels.ctbl"
    assert color_table_path(tmp_path / "a.b-labels.nrrd") == tmp_path / "a.b-labels.ctbl"
    path = write_color_table([Label("liver", 5, (10, 20, 30)), Label("left kidney", 2)], tmp_path / "t.ctbl")
    table = read_color_table(path)
    assert table[5] == ("liver", (10, 20, 30, 255))
    assert table[2][0] == "left kidney" and table[0][0] == "Background"
    path.write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="already exists"):
        write_color_table([Label("liver", 5)], path)
    assert path.read_text(encoding="utf-8") == "mine"


def test_segment_says_and_writes_which_value_is_which_label(tmp_path, capsys):
    """Two labels on a coronal template slice: values 1 and 2 in the order given, printed and in the colour
    table Slicer reads; counts are of the 101 coronal slices processed (the file has 30 axial ones)."""
    vol, ref = read_volume(CT), sitk.GetArrayFromImage(sitk.ReadImage(MASK))
    coronal = vol.like(ref).resliced(1).array  # (101, z, x): the coronal slices
    k = int(np.argmax(np.minimum((coronal == 5).sum(axis=(1, 2)), (coronal == 1).sum(axis=(1, 2)))))
    args = []
    for name, value in (("liver", 5), ("spleen", 1)):
        pos, neg = sample_prompts(coronal[k] == value, 3, 3, 0)
        args += [a for x, y in pos for a in ("--positive", f"{name}:{x:g},{y:g}")]
        args += [a for x, y in neg for a in ("--negative", f"{name}:{x:g},{y:g}")]
    out = tmp_path / "results"
    code = main(["segment", CT, "--template-image", CT, "--plane", "coronal", "--slice", str(k), *args,
                 "--output", str(out), "--save-template", str(tmp_path / "t.json")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "label values: 1 liver, 2 spleen (0 background)" in printed.out
    assert "of 101 coronal slices" in printed.out and "of 30" not in printed.out
    labels = out / "ct-small-labels.nii.gz"
    table = read_color_table(color_table_path(labels))
    assert {v: name for v, (name, _) in table.items()} == {0: "Background", 1: "liver", 2: "spleen"}
    saved = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["labels"]
    assert [table[lb["value"]][1][:3] for lb in saved] == [tuple(lb["color"]) for lb in saved]
    found = read_volume(labels).array
    assert ((found == 1) & (ref == 5)).sum() > ((found == 1) & (ref == 1)).sum()  # value 1 is on the liver
    assert ((found == 2) & (ref == 1)).sum() > ((found == 2) & (ref == 5)).sum()  # value 2 on the spleen
    # every file of the template is written with the same permissions (safetensors' own writer makes 0600)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("t.*")}
    assert "t.adapter.safetensors" in modes and len(set(modes.values())) == 1, modes


def test_demo_lists_every_file_it_wrote(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("FMOneShot demo: liver and spleen marked on slice 24 of case ct-small (CT) of "
                              "totalseg-ct-small (backend offline, ")  # the data used, named from its dataset.json
    wrote = sorted(line.split("wrote ", 1)[1] for line in printed.splitlines() if line.strip().startswith("wrote "))
    assert wrote == sorted(str(p) for p in out.iterdir()) and len(wrote) == 7
    assert "label values: 5 liver, 1 spleen (0 background)" in printed
    assert "storage order" in printed  # the montage is shown as read, the points count as stored
    table = read_color_table(out / "ct-small-labels.ctbl")
    assert table[5][0] == "liver" and table[1][0] == "spleen"
    # a second run refuses before any work, whichever of the files exists
    (out / "montage.png").unlink()
    kept = (out / "template.adapter.safetensors").read_bytes()
    assert main(["demo", "--output", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and not (out / "montage.png").exists()
    assert (out / "template.adapter.safetensors").read_bytes() == kept


def test_eval_names_the_adapter_and_backend_that_ran(tmp_path, capsys, sample):
    out = tmp_path / "e.json"
    assert main(["eval", str(sample), "--labels", "spleen", "--max-targets", "2", "--backend", "auto",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert (doc["backend"], doc["adapter"]) == ("offline", "classification")  # 'auto' resolved: no weights
    assert "backend offline, adapter classification," in capsys.readouterr().out


def test_landmark_pictures_use_the_colour_key(tmp_path):
    """Reference white, found yellow, as the reference outline is white in segmentation pictures."""
    summary, pictures = evaluate(make_landmark_dataset(tmp_path / "lm"), keep_pictures=True)
    pic = pictures[0].picture
    truth = json.loads((tmp_path / "lm" / "points" / f"{pictures[0].case}.json").read_text(encoding="utf-8"))
    colours = {tuple(int(c) for c in pic[y, x]) for x, y in truth.values()}
    assert colours <= {REFERENCE_COLOR, FOUND_LANDMARK_COLOR}  # found landmarks can hide the reference
    assert FOUND_LANDMARK_COLOR in {tuple(int(c) for c in px) for px in pic.reshape(-1, 3)}


def test_weights_list_names_the_cache_it_uses_and_where_the_urls_are(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FMONESHOT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["weights", "list"]) == 0
    printed = capsys.readouterr().out
    assert f"cache: {tmp_path / 'xdg' / 'fmoneshot'} " in printed and "weights list --json" in printed
    assert main(["weights", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert next(r for r in rows if r["name"] == "sam_vit_b")["url"].endswith("/sam_vit_b_01ec64.pth")
    assert not (tmp_path / "xdg").exists()  # listing creates nothing
