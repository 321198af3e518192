"""The Slicer panel cannot silently break: every widget the module's code names exists in the .ui, every
parameter-node binding in the .ui names a field of the parameter node, the choices offered are the library's,
and the extension's metadata agree. Read from the files: the Slicer application is not needed."""

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI = REPO / "Resources" / "UI" / "FMOneShot.ui"
MODULE = REPO / "FMOneShot" / "FMOneShot.py"


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI).getroot()


@pytest.fixture(scope="module")
def module():
    return ast.parse(MODULE.read_text())


def widgets(ui) -> dict:
    return {w.get("name"): w for w in ui.iter("widget")}


def bindings(ui) -> dict:
    """widget name -> SlicerParameterName"""
    out = {}
    for w in ui.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                out[w.get("name")] = p.find("string").text
    return out


def parameter_fields(module) -> dict:
    """Fields (name -> default or None) of the class decorated with @parameterNodeWrapper."""
    for node in ast.walk(module):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: (ast.literal_eval(s.value) if s.value is not None else None)
                    for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in FMOneShot.py")


def items(widget) -> list:
    return [i.find("property/string").text for i in widget.findall("item")]


def test_every_widget_the_code_uses_exists(ui, module):
    used = {n.attr for n in ast.walk(module) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"}
    assert used, "the module uses no widget: the test would prove nothing"
    missing = sorted(used - set(widgets(ui)))
    assert not missing, f"FMOneShot.py uses widgets that Resources/UI/FMOneShot.ui lacks: {missing}"


def test_every_binding_names_a_parameter_field(ui, module):
    fields = parameter_fields(module)
    bound = bindings(ui)
    unknown = {w: p for w, p in bound.items() if p not in fields}
    assert not unknown, f"SlicerParameterName values with no parameter-node field: {unknown}"
    # and every field is bound to a widget or read by the code (none is dead)
    read = {n.attr for n in ast.walk(module) if isinstance(n, ast.Attribute)}
    dead = [f for f in fields if f not in bound.values() and f not in read]
    assert not dead, f"parameter-node fields neither bound nor used: {dead}"


def test_choices_are_the_librarys(ui, module):
    from FMOneShotLib import mrml
    from FMOneShotLib.adapters import ADAPTERS
    from FMOneShotLib.features import available_backends
    from FMOneShotLib.segmenters import SEGMENTERS

    w = widgets(ui)
    backends = items(w["backendComboBox"])
    assert backends[:2] == ["auto", "offline"]  # the defaults a user meets first
    assert sorted(backends[2:]) == sorted(b for b in available_backends() if b != "offline")
    assert sorted(items(w["adapterComboBox"])) == sorted(["auto", "none", *ADAPTERS])
    assert sorted(items(w["segmenterComboBox"])) == sorted(["auto", *SEGMENTERS])
    assert items(w["exportFormatComboBox"]) == list(mrml.EXPORT_FORMATS)
    assert items(w["orientationComboBox"]) == ["auto", "axial", "coronal", "sagittal"]
    # each field's default is one of its widget's choices, so a fresh panel shows what the code uses
    fields = parameter_fields(module)
    for widget, field in bindings(ui).items():
        if w[widget].get("class") == "QComboBox":
            assert fields[field] in items(w[widget]), (field, fields[field])


def test_extension_metadata_agree():
    cmake = (REPO / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key), key
    entry = json.loads((REPO / "FMOneShot.json").read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-")
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].removesuffix(".git") == meta["EXTENSION_HOMEPAGE"]
    # the files the icon and screenshot URLs point at are in the repository
    for url in (meta["EXTENSION_ICONURL"], meta["EXTENSION_SCREENSHOTURLS"]):
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url
    module_cmake = (REPO / "FMOneShot" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module_cmake and "slicer_add_python_unittest" in module_cmake
    for listed in re.findall(r"^\s+((?:Resources|Testing)/\S+)$", module_cmake, re.M):
        assert (REPO / listed.replace("${MODULE_NAME}", "FMOneShot")).is_file(), listed
