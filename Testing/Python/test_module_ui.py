"""The Slicer panel cannot silently break: every widget the module's code names exists in the .ui, every
parameter-node binding in the .ui names a field of the parameter node, every combo box bound to a str field has
the Choice annotation Slicer requires, with the library's choices, the module finds its library and resources
from a clone and from the installed layout, opening the panel imports nothing Slicer does not ship, the library
runs on Python 3.9 and imports on Windows, and the extension's metadata agree.

No Slicer application runs here. The module file is run in a subprocess against a stand-in for the parts of
Slicer above MRML (Qt, ScriptedLoadableModule, the parameter-node wrapper: HARNESS below), with slicer-core's
real MRML scene underneath; what the stand-in cannot show was checked against Slicer's source (docs/slicer.md).
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
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
    return ast.parse(MODULE.read_text(encoding="utf-8"))


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


# ---------------------------------------------------------------------------------------------------- Slicer stand-in
# What Slicer ships in its Python (numpy, SimpleITK, packaging, vtk, the MRML libraries); every other requirement
# of FMOneShotLib/requirements.py is made unimportable while the panel opens, as in a fresh Slicer.
SHIPPED_WITH_SLICER = {"numpy", "SimpleITK", "packaging"}

HARNESS = r"""
import contextlib, importlib.abc, json, os, sys, types, typing, unittest
from unittest import mock

module_dir, blocked, mode = sys.argv[1], set(json.loads(sys.argv[2])), sys.argv[3]
selftest, export_job = mode == "selftest", json.loads(sys.argv[4]) if mode == "export" else None
attempts = []


class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            attempts.append(name)
            raise ImportError(f"{name} is made unimportable by the test")


sys.meta_path.insert(0, Unimportable())
# Slicer puts only the module's own folder on sys.path: no other copy of FMOneShotLib may be importable (the
# checkout through PYTHONPATH or the working folder, an editable install's finder)
sys.path[:] = [module_dir] + [p for p in sys.path[1:]
                              if p and not os.path.isdir(os.path.join(os.path.abspath(p), "FMOneShotLib"))]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]

import slicer  # slicer-core: the real MRML scene and classes
import slicer.util

qt = mock.MagicMock(name="qt")
qt.QSettings.return_value.value.side_effect = lambda key, default=None: default
sys.modules.update(qt=qt, ctk=mock.MagicMock(name="ctk"))
slicer.app = mock.MagicMock(name="slicer.app")
slicer.app.defaultScenePath = os.getcwd()
slicer.mrmlScene = slicer.vtkMRMLScene()
slicer.qSlicerMarkupsPlaceWidget = mock.MagicMock(name="qSlicerMarkupsPlaceWidget")
loaded_ui = []


def loadUI(path):
    loaded_ui.append(path)
    if not os.path.isfile(path):
        raise RuntimeError(f"loadUI: no file {path}")
    return mock.MagicMock(name="uiWidget")


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    yield  # Slicer shows the error and swallows it; here it propagates so the test sees it


slicer.util.loadUI = loadUI
slicer.util.childWidgetVariables = lambda widget: mock.MagicMock(name="ui")
slicer.util.tryWithErrorDisplay = tryWithErrorDisplay
for name in ("confirmOkCancelDisplay", "warningDisplay", "infoDisplay", "errorDisplay", "showStatusMessage",
             "setSliceViewerLayers", "pip_install"):
    setattr(slicer.util, name, mock.MagicMock(name=name))

slm = types.ModuleType("slicer.ScriptedLoadableModule")


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.layout = mock.MagicMock(name="layout")

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Logic")]

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        pass


slm.ScriptedLoadableModule, slm.ScriptedLoadableModuleWidget = ScriptedLoadableModule, ScriptedLoadableModuleWidget
slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
pnw = types.ModuleType("slicer.parameterNodeWrapper")


class Choice:  # slicer.parameterNodeWrapper.Choice: the valid values in .choices
    def __init__(self, choices):
        self.choices = choices


def parameterNodeWrapper(cls):
    # as Slicer's wrapper: the annotations are evaluated (typing.get_type_hints) and each default validated
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        choice = next((a for a in getattr(hint, "__metadata__", ()) if isinstance(a, Choice)), None)
        base = typing.get_origin(hint) and typing.get_args(hint)[0] or hint
        default = getattr(cls, name, None)
        if choice is not None and default not in choice.choices:
            raise ValueError(f"{name}: default {default!r} not in {choice.choices}")
        fields[name] = {"type": getattr(base, "__name__", str(base)),
                        "choices": list(choice.choices) if choice else None,
                        "default": default if isinstance(default, (str, bool, int, float)) else None}

    def __init__(self, node):
        self.parameterNode = node
        for name in fields:
            setattr(self, name, getattr(cls, name, None))

    cls.__init__ = __init__
    cls.connectGui = lambda self, gui: object()
    cls.disconnectGui = lambda self, tag: None
    cls.fields = fields
    return cls


pnw.Choice, pnw.parameterNodeWrapper = Choice, parameterNodeWrapper
sys.modules.update({"slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw})
slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = slm, pnw

report = {"cache_env": os.environ.get("FMONESHOT_CACHE")}
import FMOneShot

report["module_file"] = FMOneShot.__file__
real_ensure = FMOneShot.FMOneShotLogic.ensureDependencies
import time

polls = []
report["responsive"] = {"value": FMOneShot.runWhileResponsive(lambda: (time.sleep(0.5), 7)[1], lambda: polls.append(1)),
                        "polls": len(polls)}
try:
    FMOneShot.runWhileResponsive(lambda: 1 / 0, lambda: None)
except ZeroDivisionError:
    report["responsive"]["error"] = "ZeroDivisionError"
# Slicer's root handler writes into a Qt model: what the worker logs is handled in the main thread
import logging
import threading

handled = []


class RecordThread(logging.Handler):
    def emit(self, record):
        handled.append((record.getMessage(), threading.current_thread() is threading.main_thread()))


logging.getLogger().addHandler(RecordThread())
logging.getLogger().setLevel(logging.DEBUG)


def logs():
    logging.getLogger("timm.models").debug("worker debug")
    logging.warning("worker warning")
    time.sleep(0.2)
    return 1


FMOneShot.runWhileResponsive(logs, lambda: logging.info("main %d", len(handled)))
report["responsive"]["logged"] = handled
report["fields"] = FMOneShot.FMOneShotParameterNode.fields
module = FMOneShot.FMOneShot(mock.MagicMock(name="parent"))
report["icon"] = qt.QIcon.call_args[0][0]
widget = FMOneShot.FMOneShotWidget(mock.MagicMock(name="parent"))
widget.setup()
widget.exit()
widget.enter()
widget.logic.addLabel("liver", (200, 10, 10))
widget.refreshLabels()
report["labels"] = [p.name for p in widget.logic.labels()]
# the first / last slice spin boxes of a label: in order, its extent on its point lists; "any" (-1) or out of
# order, none (the status line says why)
extents = {}
for first, last in ((3, 7), (-1, 7), (5, 5), (8, 2)):
    widget.ui.statusLabel.text = ""
    widget.onLabelExtentChanged("liver", first, last)
    extents[f"{first},{last}"] = {"stored": widget.logic.labels()[0].extent,
                                  "status": str(widget.ui.statusLabel.text)}
report["extents"] = extents
widget._parameterNode.align = "rigid"
report["options"] = {k: v for k, v in widget.logic.options(widget._parameterNode).items() if k == "align"}
widget._parameterNode.align = "affine"
# a segmenter whose package this Python cannot run (sam2 on Slicer 5.8's Python 3.9) is refused before the fit
import FMOneShotLib.requirements
FMOneShotLib.requirements.EXTRA_PYTHON["sam2"] = (99, 0)
widget._parameterNode.segmenter = "sam2"
try:
    widget.logic.fitted(None, widget.logic.options(widget._parameterNode))
except FMOneShotLib.errors.FMOneShotError as exc:
    report["sam2_refused"] = {"problem": exc.problem, "pipeline_imported": "FMOneShotLib.pipeline" in sys.modules}
widget._parameterNode.segmenter = "auto"
FMOneShotLib.requirements.EXTRA_PYTHON["sam2"] = (3, 10)
# "Add label" passes the colour button's colour only when the user picked one (the button's colorChanged
# signal); the button then shows the label's colour, set without counting as a pick
button = widget.ui.labelColorPickerButton
report["color_signal"] = any(c.args == ("colorChanged(QColor)", widget.onLabelColorChosen)
                             for c in button.connect.call_args_list)
shown = {}
for name, picked in (("spleen", None), ("Left kidney", (10, 20, 30)), ("gallbladder", None)):
    if picked is not None:
        button.color = mock.MagicMock(**{f"{k}.return_value": v for k, v in zip(("red", "green", "blue"), picked)})
        widget.onLabelColorChosen(button.color)  # what the signal calls
    button.blockSignals.reset_mock()
    qt.QColor.reset_mock()
    widget.ui.labelNameLineEdit.text = name
    widget.onAddLabel()
    shown[name] = {"rgb": list(qt.QColor.call_args.args),
                   "blocked": [c.args for c in button.blockSignals.call_args_list]}
report["label_colors"] = {p.name: list(p.color) for p in widget.logic.labels()}
report["name_signal"] = any(c.args == ("textChanged(QString)", widget.onLabelNameChanged)
                            for c in widget.ui.labelNameLineEdit.connect.call_args_list)
previews = {}
for typed in ("Urinary bladder", "my structure", ""):  # while typing, with no colour picked: what it will get
    qt.QColor.reset_mock()
    widget.onLabelNameChanged(typed)
    previews[typed] = list(qt.QColor.call_args.args) if qt.QColor.called else None
button.color = mock.MagicMock()
widget.onLabelColorChosen(button.color)
qt.QColor.reset_mock()
widget.onLabelNameChanged("liver 2")  # a picked colour is not replaced by the preview
previews["after a pick"] = qt.QColor.called
report["label_color_previews"] = previews
report["label_colors_shown"] = shown
FMOneShot.FMOneShotLogic.ensureDependencies = lambda self, ask=True: False  # the user declines the install
widget.onApply()
widget.onPreviewTemplate()
# While Apply runs: everything but Cancel disabled, and a click that Qt still delivers does nothing
during = {}


def apply(parameters, progress=None, cancel=None):
    during["enabled"] = {name: getattr(widget.ui, name).enabled for name in widget.WORK_WIDGETS}
    during["cancel"] = widget.ui.cancelButton.enabled
    before = slicer.mrmlScene.GetNumberOfNodes()
    widget.ui.labelNameLineEdit.text = "spleen"
    for click in (widget.onAddLabel, widget.onAddLandmarks, widget.onRemoveLabel, widget.onPreviewTemplate,
                  widget.onSaveTemplate, widget.onLoadTemplate, widget.onExport, widget.onDownloadWeights,
                  widget.onImportWeights, widget.onApply):
        click()
    during["nested_nodes_added"] = slicer.mrmlScene.GetNumberOfNodes() - before
    return []


FMOneShot.FMOneShotLogic.ensureDependencies = lambda self, ask=True: True
widget.logic.apply = apply
widget.onApply()
report["during_apply"] = during
report["after_apply"] = {name: getattr(widget.ui, name).enabled for name in widget.WORK_WIDGETS}
report["after_apply_cancel"] = widget.ui.cancelButton.enabled
# The real Logic.apply: each volume's computation runs in a worker thread, which only records its step and
# reads Cancel; the step is shown, and Cancel read, in the main thread (the library's pipeline and
# apply_to_nodes are stood in for: PyTorch is not importable here)
import FMOneShotLib.mrml as fm_mrml


class Cancelled(Exception):
    pass


stand_in_pipeline = types.ModuleType("FMOneShotLib.pipeline")
stand_in_pipeline.Cancelled = Cancelled
sys.modules["FMOneShotLib.pipeline"] = stand_in_pipeline
shown, worker_saw = [], {}


def on_progress(*step):
    shown.append([list(step), threading.current_thread() is threading.main_thread()])
    widget._cancelRequested = True  # the user presses Cancel once the step shows


def apply_to_nodes(template, nodes, progress=None, cancel=None, oneshot=None, per_slice_landmarks=False, run=None):
    def work():
        progress(0, 1, 1, 4, "CT")
        for _ in range(500):  # up to 5 s: the main thread's poll shows the step and reads Cancel
            if cancel():
                worker_saw["in_main_thread"] = threading.current_thread() is threading.main_thread()
                raise Cancelled("cancelled at slice 1")
            time.sleep(0.01)
        return ["not cancelled"]
    return run(work)


real_apply_to_nodes, real_check_targets = fm_mrml.apply_to_nodes, fm_mrml.check_targets
fm_mrml.apply_to_nodes, fm_mrml.check_targets = apply_to_nodes, lambda nodes: list(nodes)
apply_logic = FMOneShot.FMOneShotLogic()
apply_logic.template = lambda parameters: "template"
apply_logic.fitted = lambda template, options, poll=None: "engine"
widget.onProgress, widget._cancelRequested = on_progress, False
report["threaded_apply"] = {"result": apply_logic.apply(widget._parameterNode, progress=widget.onProgress,
                                                        cancel=widget.isCancelled),
                            "shown": shown, "worker_saw_cancel": worker_saw}
fm_mrml.apply_to_nodes, fm_mrml.check_targets = real_apply_to_nodes, real_check_targets
del sys.modules["FMOneShotLib.pipeline"], widget.onProgress
widget._cancelRequested = False
report["cache_env_after"] = os.environ.get("FMONESHOT_CACHE")
report["ui"] = loaded_ui
report["library"] = sys.modules["FMOneShotLib"].__file__
report["setup_attempts"] = list(attempts)
if selftest:
    class DependenciesAsked(Exception):
        pass

    def ensure(self, ask=True):
        raise DependenciesAsked()

    FMOneShot.FMOneShotLogic.ensureDependencies = ensure
    try:
        FMOneShot.FMOneShotTest().runTest()
        report["selftest"] = "ran"
    except DependenciesAsked:
        report["selftest"] = "asked for dependencies first"
    except ImportError as exc:
        report["selftest"] = f"ImportError: {exc}"
report["attempts"] = attempts
if export_job is not None:
    # Export as DICOM SEG from the panel: refused, before anything is asked or written, for a volume not loaded
    # from DICOM; written for one that was, its images found in slicer.dicomDatabase (the stand-in answers
    # fileForInstance as ctkDICOMDatabase does: the file, or "" for an unknown UID)
    from FMOneShotLib import mrml
    from FMOneShotLib.image import read_volume
    from FMOneShotLib.template import Label

    volume, labels = read_volume(export_job["series"]), read_volume(export_job["labels"])

    def result(name, dicom):
        node = mrml.node_from_volume(slicer.mrmlScene, volume, name=name)
        if dicom:
            node.SetAttribute("DICOM.instanceUIDs", " ".join(export_job["files"]))
        seg = mrml.segmentation_from_labels(slicer.mrmlScene, labels, [Label("liver", 1)], node, name + " result")
        seg.SetAttribute(mrml.RESULT_ATTRIBUTE, name)
        return seg

    asked = []
    FMOneShot.FMOneShotLogic.ensureDependencies = lambda self, ask=True: asked.append("dependencies") or True
    slicer.util.confirmOkCancelDisplay.side_effect = lambda *a, **k: asked.append("overwrite") or True
    out = export_job["out"]
    widget.ui.exportDirectoryButton.directory = out
    widget._parameterNode.exportFormat = ".seg.dcm"
    report["choices"] = FMOneShot.FMOneShotParameterNode.fields["exportFormat"]["choices"]
    plain = result("plain", dicom=False)
    open(os.path.join(out, "plain.seg.dcm"), "w").write("the user's file")
    try:
        widget.onExport()
        report["refused"] = None
    except Exception as exc:  # the stand-in's tryWithErrorDisplay lets it through
        report["refused"] = f"{type(exc).__name__}: {exc}"
    report["refused_asked"] = list(asked)
    report["refused_files"] = {f: open(os.path.join(out, f)).read() for f in sorted(os.listdir(out))}
    os.remove(os.path.join(out, "plain.seg.dcm"))
    slicer.mrmlScene.RemoveNode(plain)
    result("CT dicom", dicom=True)
    slicer.dicomDatabase = types.SimpleNamespace(fileForInstance=lambda uid: export_job["files"].get(uid, ""))
    widget.onExport()
    report["exported"] = sorted(os.listdir(out))
    report["exported_asked"] = asked[len(report["refused_asked"]):]
    report["status"] = str(widget.ui.statusLabel.text)
# The install path with the PyTorch extension: its PyTorchUtilsLogic with the signature of SlicerPyTorch's
# PyTorchUtils.py (a wrong keyword raises TypeError here as it would there)
from FMOneShotLib import requirements

torch_calls = []


class PyTorchUtilsLogic:
    @staticmethod
    def torchInstalled():
        return False

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        torch_calls.append({"askConfirmation": askConfirmation, "torch": torchVersionRequirement,
                            "torchvision": torchvisionVersionRequirement})
        return types.ModuleType("torch")


sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
answers = [[("torch>=2.1", None), ("torchvision>=0.16", None), ("timm>=1.0", "0.9.16"), ("scipy>=1.10", None)], []]
requirements.unmet = lambda: answers.pop(0)
slicer.util.pip_install.reset_mock()
ready = real_ensure(FMOneShot.FMOneShotLogic(), ask=False)
report["install"] = {"ready": ready, "torch": torch_calls,
                     "pip": [c.args[0] for c in slicer.util.pip_install.call_args_list]}
print("REPORT " + json.dumps(report))
"""


def run_panel(module_dir, selftest=False, blocked=None, export=None) -> dict:
    """Import the module file from ``module_dir`` as Slicer does, open its panel, and report what it did; with
    ``export`` (series folder, labels file, {SOP Instance UID: file}, output folder), export from the panel too."""
    from FMOneShotLib.requirements import REQUIREMENTS

    blocked = sorted(set(REQUIREMENTS.values()) - SHIPPED_WITH_SLICER) if blocked is None else blocked
    mode = "export" if export else "selftest" if selftest else "panel"
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(module_dir), json.dumps(blocked), mode,
                           json.dumps(export or {})], capture_output=True, text=True, cwd=module_dir,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.fixture(scope="module")
def panel():
    """The panel opened from this clone, as docs/slicer.md describes: the clone's FMOneShot/ folder is the
    module path, with everything but what Slicer ships made unimportable."""
    return run_panel(REPO / "FMOneShot", selftest=True)


def library_choices() -> dict:
    """Per combo-box field, the values the library accepts (its own tables)."""
    from FMOneShotLib import align, mrml
    from FMOneShotLib.adapters import ADAPTERS
    from FMOneShotLib.features import available_backends
    from FMOneShotLib.image import ORIENTATIONS
    from FMOneShotLib.segmenters import SEGMENTERS

    return {"orientation": ["auto", *ORIENTATIONS], "backend": ["auto", *available_backends()],
            "adapter": ["auto", "none", *ADAPTERS], "segmenter": ["auto", *SEGMENTERS],
            "device": list(mrml.DEVICES), "exportFormat": list(mrml.EXPORT_FORMATS), "align": list(align.KINDS)}


def test_every_combo_bound_str_field_has_the_librarys_choices(ui, panel):
    """Slicer's QComboBox connector raises without a Choice annotation ("ComboBoxToStringableConnector
    requires the Choice annotation to be used"), which stops every binding of the panel; it fills the combo
    box from the choices, so they must be exactly what the library accepts."""
    w = widgets(ui)
    fields = panel["fields"]
    library = library_choices()
    combos = {field: widget for widget, field in bindings(ui).items() if w[widget].get("class") == "QComboBox"}
    assert set(combos) == set(library), "a new combo box field: add the library's list of it to library_choices"
    for field, widget in combos.items():
        info = fields[field]
        assert info["choices"] is not None, (f"{field} is bound to the QComboBox {widget} without a Choice "
                                             "annotation: Slicer would refuse every binding of the panel")
        assert len(set(info["choices"])) == len(info["choices"]), field
        assert sorted(info["choices"]) == sorted(library[field]), (field, info["choices"], library[field])
        assert info["default"] == info["choices"][0], field  # what a fresh panel shows first is the default
    assert fields["backend"]["choices"][:2] == ["auto", "offline"]  # the defaults a user meets first
    from FMOneShotLib.align import DEFAULT_KIND

    assert fields["align"]["default"] == DEFAULT_KIND  # the panel aligns as the command line does
    # and no combo box carries items of its own in the .ui (the binding replaces them)
    assert not [name for name in combos.values() if w[name].findall("item")]


# Slicer's GUI connectors (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py): the exact widget class
# (``type(widget) == ...``, so no subclass) -> the field types it binds. A QComboBox also needs a Choice (tested
# above); a node combo box takes a node class or a union of them. Any other pair makes connectGui raise "Unable
# to create GUI connector", which stops every binding of the panel.
SLICER_CONNECTORS = {"QCheckBox": {"bool"}, "QPushButton": {"bool"}, "QSlider": {"int"}, "QSpinBox": {"int"},
                     "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"},
                     "QComboBox": {"str", "int", "float", "bool"}, "QLineEdit": {"str"}, "QTextEdit": {"str"},
                     "ctkPathLineEdit": {"Path"}, "ctkDirectoryButton": {"Path"}}


def test_every_binding_is_a_pair_slicers_connectors_support(ui, panel):
    w = widgets(ui)
    unsupported = {}
    for widget, field in bindings(ui).items():
        cls, kind = w[widget].get("class"), panel["fields"][field]["type"]
        ok = (kind.startswith("vtkMRML") and kind.endswith("Node")) if cls == "qMRMLNodeComboBox" else \
            kind in SLICER_CONNECTORS.get(cls, ())
        if not ok:
            unsupported[widget] = (cls, field, kind)
    assert not unsupported, f"bindings no connector of Slicer's parameter-node wrapper makes: {unsupported}"


def test_the_panel_opens_from_a_clone_without_pytorch(panel):
    """docs/slicer.md: the clone's FMOneShot/ folder as the module path finds FMOneShotLib and Resources at the
    top of the clone; opening the panel, entering and leaving it, adding a label, and Apply declined at the
    install question import nothing Slicer does not ship (torch, timm, segment-anything, scipy, ...)."""
    assert Path(panel["library"]).resolve() == (REPO / "FMOneShotLib" / "__init__.py").resolve()
    assert [Path(p).resolve() for p in panel["ui"]] == [(REPO / "Resources" / "UI" / "FMOneShot.ui").resolve()]
    assert Path(panel["icon"]).resolve() == (REPO / "Resources" / "Icons" / "FMOneShot.png").resolve()
    assert panel["labels"] == ["liver"]
    assert panel["setup_attempts"] == [], f"the panel imported what Slicer does not ship: {panel['setup_attempts']}"


def test_a_segmenter_this_python_cannot_run_is_refused_before_the_fit(panel):
    """The sam2 choice on a Python the sam2 package does not support (Slicer 5.8) stops with that reason before
    the pipeline (PyTorch) is even imported."""
    assert panel["sam2_refused"]["problem"].startswith("The segmenter sam2 needs Python 99.0 or later")
    assert panel["sam2_refused"]["pipeline_imported"] is False


def test_the_alignment_and_a_labels_extent_reach_the_library(panel):
    """issue 15: the Alignment combo's choice goes to OneShot through mrml.run_options; a label's first / last
    slice spin boxes store its extent on its point lists when both are set and in order, else clear it."""
    assert panel["options"] == {"align": "rigid"}
    extents = panel["extents"]
    assert extents["3,7"] == {"stored": [3, 7], "status": ""}
    assert extents["-1,7"]["stored"] is None and extents["5,5"]["stored"] == [5, 5]
    assert extents["8,2"]["stored"] is None and "first slice (8) is after the last (2)" in extents["8,2"]["status"]


def test_add_label_passes_a_colour_only_when_the_user_picked_one(panel):
    """issue 21: a label added without picking a colour gets its structure's conventional colour (the
    terminology table's), one added after a pick gets the picked colour, and the next one its own again; the
    colour button shows each label's colour without that counting as a pick (signals blocked)."""
    from FMOneShotLib.terminology import default_color, for_name

    assert panel["color_signal"], "the colour button's colorChanged(QColor) is not connected to onLabelColorChosen"
    colors = panel["label_colors"]
    spleen, gallbladder = for_name("spleen").color, for_name("gallbladder").color
    assert spleen and gallbladder and tuple(spleen) != default_color(2)  # not what the palette would give
    assert colors == {"liver": [200, 10, 10], "spleen": list(spleen), "Left kidney": [10, 20, 30],
                      "gallbladder": list(gallbladder)}
    for name, shown in panel["label_colors_shown"].items():
        assert shown["rgb"] == colors[name], name
        assert shown["blocked"] == [[True], [False]], name
    # while a name is typed, the button previews the colour the label would get (5 labels in the scene)
    assert panel["name_signal"]
    previews = panel["label_color_previews"]
    bladder = for_name("Urinary bladder").color
    assert bladder and previews["Urinary bladder"] == list(bladder)
    assert previews["my structure"] == list(default_color(5))
    assert previews["after a pick"] is False
    assert previews[""] is None  # the field cleared after Add label: the added label's colour stays shown


def test_the_panel_exports_dicom_seg_only_for_a_volume_loaded_from_dicom(tmp_path):
    """issue 21: ".seg.dcm" is offered; for a volume not loaded from DICOM the export is refused with the
    reason before anything is asked, installed or written (a file of the user's with the name it would have
    written is left as it was); for one loaded from DICOM the panel passes slicer.dicomDatabase and the SEG
    read back with highdicom references the series' images and holds the segmentation's voxels."""
    hd = pytest.importorskip("highdicom", reason="highdicom is a dependency: pip install -e .")
    pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
    import numpy as np
    from dicom_series import write_dicom_series

    from FMOneShotLib.image import Volume, read_volume, write_volume

    volume = Volume(np.random.default_rng(0).integers(-100, 200, (5, 12, 14)).astype(np.int16), (0.8, 0.9, 2.5),
                    name="ct")
    written = write_dicom_series(volume, tmp_path / "series")
    series = read_volume(tmp_path / "series")
    labels = np.zeros(series.array.shape, np.uint8)
    labels[1:4, 3:8, 4:10] = 1
    write_volume(series.like(labels), tmp_path / "labels.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    report = run_panel(REPO / "FMOneShot", blocked=[], export={
        "series": str(tmp_path / "series"), "labels": str(tmp_path / "labels.nrrd"),
        "files": {uid: str(path) for _, path, uid in written}, "out": str(out)})
    assert ".seg.dcm" in report["choices"]
    assert report["refused"].startswith("FMOneShotError: The volume 'plain' was not loaded from DICOM"), \
        report["refused"]
    assert "load the series with the DICOM module" in report["refused"]
    assert report["refused_asked"] == []  # neither an install nor an overwrite was asked
    assert report["refused_files"] == {"plain.seg.dcm": "the user's file"}
    assert report["exported"] == ["CT dicom.seg.dcm"] and report["exported_asked"] == ["dependencies"]
    seg = hd.seg.segread(str(out / "CT dicom.seg.dcm"))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver"]
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    assert referenced == {uid for *_, uid in written}
    uids = [uid for _, _, uid in sorted(written)]  # slice order
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    assert np.array_equal(back, labels)


def test_while_work_runs_only_cancel_is_enabled_and_nested_clicks_do_nothing(ui, panel):
    during = panel["during_apply"]
    assert during["enabled"] and not any(during["enabled"].values()), during["enabled"]
    assert during["cancel"] is True and during["nested_nodes_added"] == 0
    assert all(panel["after_apply"].values()) and panel["after_apply_cancel"] is False
    assert set(during["enabled"]) <= set(widgets(ui))  # every name disabled is a widget of the panel
    # the scene-changing and work-starting buttons all sit inside what is disabled
    w = widgets(ui)
    inside = {n.get("name") for name in during["enabled"] for n in w[name].iter("widget")}
    for button in ("addLabelButton", "removeLabelButton", "addLandmarksButton", "previewTemplateButton",
                   "saveTemplateButton", "loadTemplateButton", "exportButton", "downloadWeightsButton",
                   "importWeightsButton", "applyButton", "templateVolumeSelector", "paintedSegmentationSelector"):
        assert button in inside, button


def test_apply_computes_in_a_worker_and_shows_progress_and_reads_cancel_in_the_main_thread(panel):
    """Logic.apply hands each volume's computation to a worker thread: the step the worker records is shown by
    the main thread (the widget's onProgress touches Qt), Cancel pressed there reaches the worker at its next
    check, and the run ends as cancelled (None: nothing added)."""
    run = panel["threaded_apply"]
    assert run["result"] is None
    assert run["shown"] and run["shown"][0] == [[0, 1, 1, 4, "CT"], True]
    assert all(in_main for _, in_main in run["shown"])
    assert run["worker_saw_cancel"] == {"in_main_thread": False}


def test_long_work_runs_while_the_panel_keeps_processing_events(panel):
    """The fit (models, template features, adapter training) runs in a worker thread while the main thread
    processes Qt events every 50 ms: 0.5 s of work gives about ten polls (at least three under any load), its
    value comes back and its exception is raised in the caller."""
    assert panel["responsive"]["value"] == 7 and panel["responsive"]["polls"] >= 3
    assert panel["responsive"]["error"] == "ZeroDivisionError"
    # what the worker logs is handled (once each) in the main thread, as Slicer's root handler (a Qt model)
    # needs; the main thread's own records pass at once
    logged = panel["responsive"]["logged"]
    assert [m for m, _ in logged if m.startswith("worker")] == ["worker debug", "worker warning"]
    assert all(main for _, main in logged), logged
    assert any(m.startswith("main") for m, _ in logged)


def test_opening_the_panel_leaves_the_weights_folder_to_the_user(panel):
    """Weights are not put in Slicer's cache folder (Settings > Cache > Clear deletes it): without a folder
    chosen in the panel, the library's default (the command line's) stays in force."""
    assert panel["cache_env_after"] == panel["cache_env"]


def test_the_self_test_asks_for_dependencies_before_importing_them(panel):
    assert panel["selftest"] == "asked for dependencies first"
    assert panel["attempts"] == []


def test_pytorch_comes_from_the_extension_with_both_minimums_and_the_rest_from_pip(panel):
    """With the PyTorch extension and no torch: torch and torchvision through its installTorch, with
    FMOneShot's minimum of each (light-the-torch installs both, built for the GPU), never through pip, which
    would pair them with another build; the rest (a too old timm, scipy) with one pip_install of a string,
    which every Slicer version splits into arguments (not all accept a list)."""
    from FMOneShotLib.requirements import REQUIREMENTS

    install = panel["install"]
    assert install["torch"] == [{"askConfirmation": False, "torch": ">=2.1", "torchvision": ">=0.16"}]
    assert install["pip"] == ["timm>=1.0 scipy>=1.10"]
    assert not [r for r in REQUIREMENTS if re.search(r"[\s'\"]", r)]  # so that splitting the string is exact
    assert install["ready"] is True


def test_the_panel_opens_from_the_installed_layout(tmp_path):
    """FMOneShot/CMakeLists.txt installs the module file with FMOneShotLib and Resources beside it."""
    root = tmp_path / "qt-scripted-modules"
    root.mkdir()
    shutil.copy(MODULE, root)
    shutil.copytree(REPO / "FMOneShotLib", root / "FMOneShotLib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "Resources", root / "Resources")
    report = run_panel(root)
    assert Path(report["library"]).resolve() == (root / "FMOneShotLib" / "__init__.py").resolve()
    assert Path(report["ui"][0]).resolve() == (root / "Resources" / "UI" / "FMOneShot.ui").resolve()
    assert report["setup_attempts"] == []


def test_a_module_file_without_its_library_says_how_to_fix_it(tmp_path):
    shutil.copy(MODULE, tmp_path)
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(tmp_path), "[]", "panel"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "ImportError: FMOneShot: FMOneShotLib/ and Resources/UI/FMOneShot.ui are neither beside" in proc.stderr
    assert "additional module paths" in proc.stderr


# ---------------------------------------------------------------------------------------------------- Python 3.9
def python_files():
    return [*sorted((REPO / "FMOneShotLib").rglob("*.py")), MODULE]


def test_library_and_module_run_on_python_3_9():
    """Slicer 5.8 runs Python 3.9: vermin finds no newer syntax or standard-library API, and an ``X | Y``
    annotation (evaluated when its function is defined, which 3.9 cannot) only appears under
    ``from __future__ import annotations``. The module file has no such import, as Slicer's parameter-node
    wrapper evaluates its annotations."""
    try:
        import vermin  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("vermin is missing: the [test] extra installs it")
        pytest.skip("vermin is not installed: pip install -e '.[test]'")
    run = "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())"
    proc = subprocess.run([sys.executable, "-c", run, "-t=3.9-", "--no-tips", "--violations",
                           *map(str, python_files())], capture_output=True, text=True)
    assert proc.returncode == 0 and "Minimum required versions: 3." in proc.stdout, proc.stdout + proc.stderr
    late = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                     and any(a.name == "annotations" for a in n.names) for n in tree.body)
        for node in ast.walk(tree):
            notes = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                notes = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                                                 args.vararg, args.kwarg] if a is not None] + [node.returns]
            elif isinstance(node, ast.AnnAssign):
                notes = [node.annotation]
            for note in notes:
                if note is not None and not future and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                                           for n in ast.walk(note)):
                    late.append(f"{path.relative_to(REPO)}:{note.lineno}")
        # isinstance(x, A | B) needs 3.10 whatever is imported
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass")
                    and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp)):
                late.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not late, f"X | Y types that Python 3.9 cannot evaluate: {late}"
    assert "from __future__ import annotations" not in MODULE.read_text(encoding="utf-8")
    assert re.search(r'requires-python = ">=3\.9"', (REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_library_imports_on_windows():
    """Every module of FMOneShotLib imports with the POSIX-only standard modules made unimportable."""
    code = ("import importlib, importlib.abc, pkgutil, sys\n"
            "class NoPosix(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name in ('resource', 'fcntl', 'termios', 'grp', 'pwd'):\n"
            "            raise ImportError(name + ' does not exist on Windows')\n"
            "for name in ('resource', 'fcntl', 'termios', 'grp', 'pwd'):\n"
            "    sys.modules.pop(name, None)\n"
            "sys.meta_path.insert(0, NoPosix())\n"
            "import FMOneShotLib\n"
            "names = [m.name for m in pkgutil.walk_packages(FMOneShotLib.__path__, 'FMOneShotLib.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "print(len(names))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 20  # every module was imported, not none


def test_extension_metadata_agree():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key), key
    entry = json.loads((REPO / "FMOneShot.json").read_text(encoding="utf-8"))
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    # what that schema allows (Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: these
    # properties only, "additionalProperties": false; $schema, category and scm_url required; enums)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry), set(entry) - allowed
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 5) in (1, 3, 5)
    assert all(isinstance(entry[k], str) for k in ("category", "scm_url", "scm_revision", "build_subdirectory"))
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].removesuffix(".git") == meta["EXTENSION_HOMEPAGE"]
    # the files the icon and screenshot URLs point at are in the repository
    for url in (meta["EXTENSION_ICONURL"], meta["EXTENSION_SCREENSHOTURLS"]):
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url
    module_cmake = (REPO / "FMOneShot" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in module_cmake and "slicer_add_python_unittest" in module_cmake
    for listed in re.findall(r"^\s+((?:Resources|Testing|FMOneShotLib)/\S+)$", module_cmake, re.M):
        assert (REPO / listed.replace("${MODULE_NAME}", "FMOneShot")).is_file(), listed
    # the install takes every .py of FMOneShotLib, subpackages included, and the data files listed one by one
    # (the terminology table): a data file added to the package without being listed would be missing
    assert re.search(r"file\(GLOB_RECURSE _lib_files .*\n\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./FMOneShotLib/\*\.py\)",
                     module_cmake), "FMOneShot/CMakeLists.txt must glob FMOneShotLib/*.py recursively"
    data = [str(f.relative_to(REPO)) for f in (REPO / "FMOneShotLib").rglob("*")
            if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts]
    listed = set(re.findall(r"^\s+(FMOneShotLib/\S+)$", module_cmake, re.M))
    assert "FMOneShotLib/resources/totalsegmentator_snomed_mapping.csv" in listed  # the test sees the list
    unlisted = sorted(set(data) - listed)
    assert not unlisted, f"FMOneShot/CMakeLists.txt does not install these files of FMOneShotLib: {unlisted}"
