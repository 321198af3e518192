"""FMOneShot: the 3D Slicer module.

Mark a structure once on a template volume (positive and negative points per label, optionally a painted
segment, named landmarks), press Apply, and every slice of the target volumes is segmented. The Widget only
maps the panel (Resources/UI/FMOneShot.ui) to Logic calls; the Logic holds the Slicer-specific steps (asking,
installing, progress) and hands everything else to FMOneShotLib, whose MRML bridge (FMOneShotLib.mrml) is
tested without the application.

Nothing heavy is imported here: torch, timm and segment-anything are checked and, with the user's consent,
installed when Apply (or a weights action) is first used.
"""

import os
import sys
from typing import Annotated


def _sourceRoot():
    """The folder that holds ``FMOneShotLib`` and ``Resources/``: beside this file where the extension is
    installed (FMOneShot/CMakeLists.txt installs them there), one folder up in a clone whose ``FMOneShot/``
    folder was added to Slicer's additional module paths (docs/slicer.md). Slicer puts only the module's own
    folder on ``sys.path``, so the root is added to it (first: a clone's library wins over another copy)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (here, os.path.dirname(here)):
        if (os.path.isfile(os.path.join(root, "FMOneShotLib", "__init__.py"))
                and os.path.isfile(os.path.join(root, "Resources", "UI", "FMOneShot.ui"))):
            if root not in sys.path:
                sys.path.insert(0, root)
            return root
    raise ImportError(f"FMOneShot: FMOneShotLib/ and Resources/UI/FMOneShot.ui are neither beside {here} nor one "
                      "folder up. Add the FMOneShot/ folder of a complete clone to the additional module paths "
                      "(Edit > Application Settings > Modules), or reinstall the extension.")


SOURCE_ROOT = _sourceRoot()

import qt  # noqa: E402  (after the library's folder is known, as every import below may need it)

import slicer  # noqa: E402
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,  # noqa: E402
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper  # noqa: E402
from slicer.util import VTKObservationMixin  # noqa: E402


def resourcePath(filename):
    """A file of the panel's ``Resources/`` folder, installed or in a clone (Slicer's own resourcePath looks
    only beside the module file)."""
    return os.path.join(SOURCE_ROOT, "Resources", filename)


class FMOneShot(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FMOneShot"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["FMOneShot developers"]
        self.parent.helpText = (
            "Mark a structure once on a template slice (positive and negative points per label, or a painted "
            "segment; or named landmarks), press Apply: FMOneShot finds it on every slice of the target volumes "
            "with foundation-model features and draws the masks with Segment Anything (or offline methods). "
            "See <a href='https://github.com/fmoneshot/SlicerFMOneShot#3d-slicer'>the documentation</a>.")
        self.parent.acknowledgementText = (
            "Method: Anand et al. 2023, one-shot localization and segmentation of medical images with foundation "
            "models; data-adaptive few-shot multi-label segmentation with foundation models.")
        self.parent.icon = qt.QIcon(resourcePath("Icons/FMOneShot.png"))

    def resourcePath(self, filename):
        return resourcePath(filename)


# The choices of the panel's combo boxes. Slicer's parameter-node binding of a QComboBox to a str field needs
# them as a Choice annotation (it fills the combo box from it and refuses to bind without one, which stops every
# binding of the panel). They are the library's own lists, written out here because those live in modules that
# import PyTorch, which is not installed when Slicer starts; Testing/Python/test_module_ui.py holds them equal.
ORIENTATIONS = ["auto", "axial", "coronal", "sagittal"]  # FMOneShotLib.image.ORIENTATIONS, and auto
BACKENDS = ["auto", "offline", "d2s14", "d2b14", "d2l14", "d2g14", "d1s8", "d1s16", "d1b8", "d1b16", "d3s16",
            "d3b16", "clip", "sam", "sd"]  # FMOneShotLib.features.available_backends(), and auto
ADAPTERS = ["auto", "none", "basic", "classification", "contrastive"]  # FMOneShotLib.adapters.ADAPTERS
SEGMENTERS = ["auto", "sam2", "sam", "offline", "none"]  # FMOneShotLib.segmenters.SEGMENTERS, and auto
DEVICES = ["auto", "cpu", "cuda"]  # FMOneShotLib.mrml.DEVICES
ALIGNMENTS = ["auto", "none", "rigid", "similarity", "affine", "bspline"]  # FMOneShotLib.align.KINDS, DEFAULT_KIND first
EXPORT_FORMATS = [".nrrd", ".nii.gz", ".seg.nrrd", ".seg.dcm"]  # FMOneShotLib.mrml.EXPORT_FORMATS
DICOM_SEG_EXPORT = ".seg.dcm"  # FMOneShotLib.mrml.DICOM_SEG_EXPORT: only for volumes loaded from DICOM


@parameterNodeWrapper
class FMOneShotParameterNode:
    """What the panel shows, saved with the scene. The labels themselves are tagged point lists in the scene
    (FMOneShotLib.mrml.add_label), so they are saved too. A new field: add it here (a str shown in a combo box
    with its ``Choice``) and give its widget the ``SlicerParameterName`` property in Resources/UI/FMOneShot.ui."""

    templateVolume: slicer.vtkMRMLScalarVolumeNode
    targetVolume: slicer.vtkMRMLScalarVolumeNode
    paintedSegmentation: slicer.vtkMRMLSegmentationNode
    orientation: Annotated[str, Choice(ORIENTATIONS)] = "auto"
    backend: Annotated[str, Choice(BACKENDS)] = "auto"
    adapter: Annotated[str, Choice(ADAPTERS)] = "auto"
    augment: bool = False
    segmenter: Annotated[str, Choice(SEGMENTERS)] = "auto"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    align: Annotated[str, Choice(ALIGNMENTS)] = "auto"
    applyToAll: bool = False
    perSliceLandmarks: bool = False
    exportFormat: Annotated[str, Choice(EXPORT_FORMATS)] = ".nrrd"


class FMOneShotWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    # While work runs, everything that changes the scene or starts work is disabled (Cancel stays enabled):
    # the progress callback processes events so that Cancel can be pressed, and any other button would run
    # nested inside the work.
    WORK_WIDGETS = ("templateCollapsibleButton", "methodCollapsibleButton", "exportCollapsibleButton",
                    "weightsCollapsibleButton", "targetVolumeSelector", "applyToAllCheckBox",
                    "perSliceLandmarksCheckBox", "applyButton")

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._running = False
        self._labelColorChosen = False  # the user picked a colour for the next label (else its conventional one)

    def resourcePath(self, filename):
        return resourcePath(filename)

    # ------------------------------------------------------------------ set up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMOneShot.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FMOneShotLogic()

        self.ui.labelsTableWidget.setColumnCount(5)
        self.ui.labelsTableWidget.setHorizontalHeaderLabels(["Label", "Positive", "Negative", "First slice",
                                                             "Last slice"])
        self.ui.labelsTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.labelColorPickerButton.color = qt.QColor(221, 130, 101)  # before the connection: not a choice
        self.ui.weightsComboBox.addItems(self.logic.checkpointNames())
        self.ui.weightsDirectoryButton.directory = self.logic.weightsFolder()
        self.ui.exportDirectoryButton.directory = self.logic.exportFolder()

        self.ui.labelColorPickerButton.connect("colorChanged(QColor)", self.onLabelColorChosen)
        self.ui.addLabelButton.connect("clicked(bool)", self.onAddLabel)
        self.ui.labelNameLineEdit.connect("returnPressed()", self.onAddLabel)
        self.ui.labelNameLineEdit.connect("textChanged(QString)", self.onLabelNameChanged)
        self.ui.removeLabelButton.connect("clicked(bool)", self.onRemoveLabel)
        self.ui.addLandmarksButton.connect("clicked(bool)", self.onAddLandmarks)
        self.ui.previewTemplateButton.connect("clicked(bool)", self.onPreviewTemplate)
        self.ui.saveTemplateButton.connect("clicked(bool)", self.onSaveTemplate)
        self.ui.loadTemplateButton.connect("clicked(bool)", self.onLoadTemplate)
        self.ui.clearTemplateButton.connect("clicked(bool)", self.onClearTemplate)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.weightsDirectoryButton.connect("directoryChanged(QString)", self.onWeightsFolderChanged)
        self.ui.backendComboBox.connect("currentIndexChanged(int)", self.updateBackendStatus)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodesChanged)
        self.initializeParameterNode()
        self.refreshLabels()
        self.updateBackendStatus()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.refreshLabels()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.templateVolume:
            greyValue = self.logic.greyValueVolumes()  # not a labelmap, RGB or DWI volume (also scalar nodes)
            if greyValue:
                self._parameterNode.templateVolume = greyValue[0]

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def setWorking(self, working):
        """Work started (True) or ended (False): disable or enable everything but Cancel."""
        self._running = working
        for name in self.WORK_WIDGETS:
            getattr(self.ui, name).enabled = not working
        self.ui.cancelButton.enabled = working
        self.ui.progressBar.visible = working

    # ------------------------------------------------------------------ labels
    def onNodesChanged(self, caller=None, event=None):
        if not self._running:
            qt.QTimer.singleShot(0, self.refreshLabels)

    def refreshLabels(self):
        """One row per label in the scene: its name (not editable: the name is the label's identity) and colour,
        and a place widget per point list."""
        prompts = self.logic.labels()
        table = self.ui.labelsTableWidget
        table.setRowCount(len(prompts))
        for row, prompt in enumerate(prompts):
            item = qt.QTableWidgetItem(prompt.name)
            item.setFlags(item.flags() & ~qt.Qt.ItemIsEditable)
            item.setData(qt.Qt.UserRole, prompt.name)
            if prompt.color:
                item.setBackground(qt.QBrush(qt.QColor(*prompt.color)))
            table.setItem(row, 0, item)
            for column, node in ((1, prompt.positive), (2, prompt.negative)):
                place = slicer.qSlicerMarkupsPlaceWidget()
                place.setMRMLScene(slicer.mrmlScene)
                place.buttonsVisible = False
                place.placeButton().show()
                place.deleteButton().show()
                place.setCurrentNode(node)
                table.setCellWidget(row, column, place)
            # the extent: first and last slice where the structure lies ("any" at -1: no extent)
            first, last = qt.QSpinBox(), qt.QSpinBox()
            for column, box, end in ((3, first, 0), (4, last, 1)):
                box.minimum, box.maximum = -1, 99999
                box.specialValueText = "any"
                box.toolTip = ("The first and last slice (index in the template plane, as the Data Probe shows "
                               "it) where this structure lies; beyond them, mapped into the target, the structure is kept only "
                               "where it continues as confidently as inside. any: every slice.")
                box.value = prompt.extent[end] if prompt.extent else -1  # before connecting: not a change
                table.setCellWidget(row, column, box)
            for box in (first, last):
                box.connect("valueChanged(int)", lambda value, name=prompt.name, first=first, last=last:
                            self.onLabelExtentChanged(name, first.value, last.value))
        landmarks = self.logic.landmarksNode()
        self.ui.landmarksPlaceWidget.enabled = landmarks is not None
        if landmarks is not None:
            self.ui.landmarksPlaceWidget.setCurrentNode(landmarks)

    def onLabelExtentChanged(self, name, first, last):
        """The first / last slice spin boxes of label ``name`` changed: both set (not "any", -1) and in order is
        the label's extent, stored on its point lists; otherwise the label has none (the status line says why
        when the ends are in the wrong order)."""
        if self._running:
            return
        extent = (first, last) if first >= 0 and last >= 0 else None
        if extent is not None and first > last:
            self.ui.statusLabel.text = (f"Label '{name}': the first slice ({first}) is after the last ({last}); "
                                        "it has no extent until they are in order.")
            extent = None
        with slicer.util.tryWithErrorDisplay(f"Could not set the extent of '{name}'.", waitCursor=False):
            self.logic.setLabelExtent(name, extent)

    def onLabelColorChosen(self, color=None):
        """The user picked a colour: the next label added gets it (instead of its conventional colour)."""
        self._labelColorChosen = True

    def onLabelNameChanged(self, name):
        """While a name is typed and no colour was picked, the button shows the colour the label will get. An
        empty name (also the field cleared after Add label) leaves the last label's colour shown."""
        if name.strip() and not self._labelColorChosen and not self._running:
            self.showColor(self.logic.newLabelColor(name))

    def onAddLabel(self):
        """A label with the colour the user picked on the colour button, else none: the library gives it the
        conventional colour of its structure (a known name) or the palette's. The button then shows the label's
        colour, and the next label again gets its own unless the user picks one."""
        if self._running:
            return
        with slicer.util.tryWithErrorDisplay("Could not add the label.", waitCursor=True):
            color = None
            if self._labelColorChosen:
                c = self.ui.labelColorPickerButton.color
                color = (c.red(), c.green(), c.blue())
            name = self.ui.labelNameLineEdit.text
            self.logic.addLabel(name, color)
            added = next(p for p in self.logic.labels() if p.name == name.strip())
            self.showColor(added.color)
            self._labelColorChosen = False
            self.ui.labelNameLineEdit.text = ""
            how = ("the colour you picked" if color is not None
                   else "its default colour (a known structure's conventional one, else the palette's)")
            self.ui.statusLabel.text = f"Label '{name.strip()}' added with {how}."
        self.refreshLabels()

    def showColor(self, rgb):
        """The colour button shows ``rgb`` (0-255) without that counting as the user's pick (its colorChanged
        signal, which ctkColorPickerButton's setColor emits too, is blocked)."""
        button = self.ui.labelColorPickerButton
        button.blockSignals(True)
        try:
            button.color = qt.QColor(*rgb)
        finally:
            button.blockSignals(False)

    def onRemoveLabel(self):
        if self._running:
            return
        row = self.ui.labelsTableWidget.currentRow()
        item = self.ui.labelsTableWidget.item(row, 0) if row >= 0 else None
        if item is None:
            slicer.util.warningDisplay("Select the label to remove in the table first.")
            return
        name = item.data(qt.Qt.UserRole)
        if slicer.util.confirmOkCancelDisplay(f"Remove the label '{name}' and its points?"):
            self.logic.removeLabel(name)
            self.refreshLabels()

    def onAddLandmarks(self):
        if self._running:
            return
        self.ui.landmarksPlaceWidget.setCurrentNode(self.logic.landmarksNode(create=True))
        self.ui.landmarksPlaceWidget.enabled = True

    # ------------------------------------------------------------------ dependencies
    def dependenciesReady(self):
        """Missing or too old packages installed with the user's consent; failures shown, never swallowed."""
        ready = False
        with slicer.util.tryWithErrorDisplay("FMOneShot could not install its Python packages.", waitCursor=True):
            ready = self.logic.ensureDependencies()
        return ready

    # ------------------------------------------------------------------ template files
    def onPreviewTemplate(self):
        if self._running or not self.dependenciesReady():
            return
        self.setWorking(True)
        try:
            with slicer.util.tryWithErrorDisplay("Could not preview the template masks.", waitCursor=True):
                preview = self.logic.previewTemplate(self._parameterNode)
                self.ui.statusLabel.text = (f"'{preview.GetName()}' shows the template masks and is now the "
                                            "painted masks: correct it in the Segment Editor, or clear 'Painted "
                                            "masks' to use the clicks again.")
        finally:
            self.setWorking(False)

    def onSaveTemplate(self):
        if self._running:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, "Save template", self.logic.exportFolder(),
                                              "FMOneShot template (*.json)")
        if not path or not self.dependenciesReady():
            return
        self.setWorking(True)
        try:
            with slicer.util.tryWithErrorDisplay("Could not save the template.", waitCursor=True):
                force = os.path.exists(path)  # the file dialog has asked already
                self.logic.saveTemplate(self._parameterNode, path, force=force)
                self.ui.statusLabel.text = f"Template saved: {path}"
        finally:
            self.setWorking(False)

    def onLoadTemplate(self):
        if self._running:
            return
        path = qt.QFileDialog.getOpenFileName(self.parent, "Load template", self.logic.exportFolder(),
                                              "FMOneShot template (*.json)")
        if not path or not self.dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("Could not load the template.", waitCursor=True):
            template = self.logic.loadTemplate(path)
            self.ui.templateFileLabel.text = (f"Template: {os.path.basename(path)} "
                                              f"({', '.join(template.label_names + template.landmark_names)})")
            self.ui.clearTemplateButton.enabled = True

    def onClearTemplate(self):
        if self._running:
            return
        self.logic.loadedTemplate = None
        self.ui.templateFileLabel.text = "Template: the marks in the scene"
        self.ui.clearTemplateButton.enabled = False

    # ------------------------------------------------------------------ apply
    def updateBackendStatus(self, *args):
        self.ui.backendStatusLabel.text = self.logic.backendStatus(self.ui.backendComboBox.currentText)

    def onApply(self):
        if self._running or not self.dependenciesReady():
            return
        self._cancelRequested = False
        self.setWorking(True)
        self.ui.progressBar.maximum = 0  # busy indicator until the first slice
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = ("Preparing the template: loading the models, template features, training the "
                                    "adapter (Cancel takes effect when this is done)...")
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay("FMOneShot could not apply the template.", waitCursor=True):
                outputs = self.logic.apply(self._parameterNode, progress=self.onProgress, cancel=self.isCancelled)
                if outputs is None:
                    self.ui.statusLabel.text = "Cancelled: the scene is as it was before Apply."
                else:
                    self.ui.statusLabel.text = self.logic.summary(outputs)
                    if outputs and outputs[0].segmentation is not None:
                        outputs[0].segmentation.CreateClosedSurfaceRepresentation()
                        slicer.util.setSliceViewerLayers(background=outputs[0].volume)
        finally:
            self.setWorking(False)
            self.refreshLabels()

    def onProgress(self, volumeIndex, volumes, done, total, name):
        self.ui.progressBar.maximum = volumes * total
        self.ui.progressBar.value = volumeIndex * total + done
        self.ui.statusLabel.text = f"Volume {volumeIndex + 1} of {volumes} ({name}): slice {done} of {total}"
        slicer.app.processEvents()  # keeps the panel responsive and lets Cancel be pressed

    def onCancel(self):
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling..."

    def isCancelled(self):
        slicer.app.processEvents()
        return self._cancelRequested

    # ------------------------------------------------------------------ export
    def onExport(self):
        if self._running:
            return
        folder = self.ui.exportDirectoryButton.directory
        fmt = self._parameterNode.exportFormat
        with slicer.util.tryWithErrorDisplay("Could not export the results.", waitCursor=True):
            # every check that needs no package first: a volume not loaded from DICOM is refused for DICOM SEG
            # before anything is asked, installed or written
            existing = self.logic.existingExports(folder, fmt)
            if fmt == DICOM_SEG_EXPORT and not self.dependenciesReady():  # highdicom writes the SEG
                return
            overwrite = False
            if existing:
                if not slicer.util.confirmOkCancelDisplay(
                        "These files exist already:\n" + "\n".join(existing) + "\n\nOverwrite them?"):
                    return
                overwrite = True
            paths = self.logic.export(folder, fmt, overwrite=overwrite)
            self.ui.statusLabel.text = f"Exported {len(paths)} file(s) to {folder}"

    # ------------------------------------------------------------------ weights
    def onWeightsFolderChanged(self, folder):
        self.logic.setWeightsFolder(folder)
        self.updateBackendStatus()

    def onDownloadWeights(self):
        if self._running:
            return
        name = self.ui.weightsComboBox.currentText
        self.setWorking(True)
        try:
            with slicer.util.tryWithErrorDisplay(f"Could not download {name}.", waitCursor=False):
                path = self.logic.downloadWeights(name, self.parent)
                if path:
                    self.ui.weightsStatusLabel.text = f"{name}: verified, {path}"
                    self.updateBackendStatus()
        finally:
            self.setWorking(False)

    def onImportWeights(self):
        if self._running:
            return
        name = self.ui.weightsComboBox.currentText
        source = qt.QFileDialog.getOpenFileName(self.parent, f"Import the checkpoint file of {name}")
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(f"Could not import {name}.", waitCursor=True):
            path = self.logic.importWeights(source, name)
            self.ui.weightsStatusLabel.text = f"{name}: verified and imported to {path}"
            self.updateBackendStatus()


class FMOneShotLogic(ScriptedLoadableModuleLogic):
    """The module's steps in Slicer: asking, installing, progress, settings. The work is FMOneShotLib's."""

    WEIGHTS_SETTING = "FMOneShot/WeightsFolder"
    EXPORT_SETTING = "FMOneShot/ExportFolder"
    _installing = False  # one install at a time, whichever panel or script asks

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        # Model weights live in a folder of the user's own (Slicer's Settings > Cache > Clear would delete
        # multi-GB checkpoints in Slicer's cache): the one chosen in the panel, else the library's default,
        # the same as the command line's (FMOneShotLib.weights.cache_dir).
        chosen = qt.QSettings().value(self.WEIGHTS_SETTING, "")
        if chosen:
            os.environ["FMONESHOT_CACHE"] = chosen
        self.loadedTemplate = None
        self.skipped = []  # [(volume name, why)] of the last Apply to all volumes

    def getParameterNode(self):
        return FMOneShotParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ settings
    def weightsFolder(self):
        from FMOneShotLib import weights

        return str(weights.cache_dir())

    def setWeightsFolder(self, folder):
        """Checkpoints are looked for and downloaded in ``folder`` from now on (remembered across sessions)."""
        if not folder:
            return
        qt.QSettings().setValue(self.WEIGHTS_SETTING, folder)
        os.environ["FMONESHOT_CACHE"] = folder

    def exportFolder(self):
        """The last folder exported to, else Slicer's default scene folder (a real folder of the user's)."""
        folder = qt.QSettings().value(self.EXPORT_SETTING, "")
        if folder and os.path.isdir(folder):
            return folder
        return slicer.app.defaultScenePath or os.path.expanduser("~")

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, ask=True):
        """Install what is missing or older than FMOneShotLib/requirements.py asks, with consent, as
        ``requirements.install_plan`` decides: torch and torchvision together through the PyTorch extension when
        it is there (the build that matches the GPU), the rest with pip. True when everything is ready; False
        when the user declined, an install is already running, or Slicer must restart first (a package that was
        already loaded got upgraded). Raises FMOneShotError, before asking, when FMOneShot must not install a
        package itself (Slicer's own SimpleITK, a torch another extension installed), and RuntimeError when an
        install fails, naming what to do."""
        from FMOneShotLib import requirements

        if FMOneShotLogic._installing:
            slicer.util.warningDisplay("FMOneShot is installing its Python packages already; wait for it to end.")
            return False
        unmet = requirements.unmet()
        if not unmet:
            return True
        pytorchUtils = _pytorchUtils()
        plan = requirements.install_plan(unmet, pytorch_extension=pytorchUtils is not None)
        lines = "\n".join(f"- {req} (installed: {have})" if have else f"- {req}" for req, have in unmet)
        if ask and not slicer.util.confirmOkCancelDisplay(
                f"FMOneShot needs these Python packages, which are missing or too old:\n{lines}\n\n"
                "Install them now? (Several GB for PyTorch; Slicer may need a restart afterwards.)",
                "FMOneShot: install dependencies"):
            return False
        loaded = [req for req, have in unmet if have and requirements.REQUIREMENTS[req] in sys.modules]
        FMOneShotLogic._installing = True
        try:
            self._install(plan, pytorchUtils)
        finally:
            FMOneShotLogic._installing = False
        still = requirements.unmet()
        if still:
            raise RuntimeError("Still missing or too old after installing: "
                               + ", ".join(f"{req} (installed: {have})" for req, have in still)
                               + ". Restart Slicer and try again; if it persists, install them from the Python "
                                 "console with slicer.util.pip_install.")
        if loaded:
            slicer.util.infoDisplay("FMOneShot upgraded packages that were already loaded ("
                                    + ", ".join(requirements.package(r) for r in loaded)
                                    + "). Restart Slicer before using FMOneShot.", "FMOneShot: restart needed")
            return False
        return True

    def _install(self, plan, pytorchUtils):
        """Runs an install plan: ``installTorch(askConfirmation=False, torchVersionRequirement=...,
        torchvisionVersionRequirement=...)`` of the PyTorch extension (it returns None when it did not install),
        then ``slicer.util.pip_install`` with the requirements in one string: every Slicer version splits a string
        into pip's arguments (Slicer 4's str.split, the current slicer/packaging.py's shlex.split), while a list
        is accepted only by later versions (not confirmed for 5.8); the requirements hold no spaces or quotes (a
        test keeps it so)."""
        if plan.torch is not None:
            with _busy("Installing PyTorch (several minutes)..."):
                if pytorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, **plan.torch) is None:
                    raise RuntimeError("The PyTorch extension could not install PyTorch. Install it with the "
                                       "PyTorch Util module, restart Slicer, and try again.")
        if plan.pip:
            with _busy("Installing " + ", ".join(plan.pip) + "..."):
                slicer.util.pip_install(" ".join(plan.pip))

    # ------------------------------------------------------------------ labels
    def labels(self):
        from FMOneShotLib import mrml

        return mrml.label_prompts(slicer.mrmlScene)

    def addLabel(self, name, color):
        from FMOneShotLib import mrml

        return mrml.add_label(slicer.mrmlScene, name, color)

    def newLabelColor(self, name):
        from FMOneShotLib import mrml

        return mrml.new_label_color(slicer.mrmlScene, name)

    def setLabelExtent(self, name, extent):
        from FMOneShotLib import mrml

        mrml.set_label_extent(slicer.mrmlScene, name, extent)

    def removeLabel(self, name):
        from FMOneShotLib import mrml

        mrml.remove_label(slicer.mrmlScene, name)

    def landmarksNode(self, create=False):
        from FMOneShotLib import mrml

        return mrml.landmarks_node(slicer.mrmlScene, create)

    # ------------------------------------------------------------------ template
    def template(self, parameters):
        """The loaded template file, else the template marked in the scene."""
        if self.loadedTemplate is not None:
            return self.loadedTemplate
        from FMOneShotLib import mrml

        orientation = None if parameters.orientation == "auto" else parameters.orientation
        return mrml.template_from_scene(parameters.templateVolume, parameters.paintedSegmentation, orientation,
                                        settings=self.options(parameters))

    def previewTemplate(self, parameters):
        """The template masks as a segmentation on the template volume, chosen as the painted masks."""
        from FMOneShotLib import mrml

        template = self.template(parameters)
        volume = parameters.templateVolume  # before the fit: the panel processes events while it runs
        oneshot = self.fitted(template, self.options(parameters))
        preview = mrml.preview_template(volume, template, oneshot)
        parameters.paintedSegmentation = preview
        return preview

    def saveTemplate(self, parameters, path, force=False):
        return self.template(parameters).save(path, force=force)

    def loadTemplate(self, path):
        from FMOneShotLib.template import Template

        self.loadedTemplate = Template.load(path)
        return self.loadedTemplate

    # ------------------------------------------------------------------ apply
    def options(self, parameters):
        from FMOneShotLib import mrml

        return mrml.run_options(parameters.backend, parameters.adapter, parameters.segmenter, parameters.device,
                                parameters.augment, align=parameters.align)

    def backendStatus(self, backend):
        from FMOneShotLib.weights import resolve_backend  # no torch: the panel opens before PyTorch is loaded

        return resolve_backend(backend)[1]

    def greyValueVolumes(self):
        from FMOneShotLib import mrml

        return mrml.volume_targets(slicer.mrmlScene)[0]

    def targets(self, parameters):
        """The target volume, or with "Apply to all" every grey-value volume (the others are skipped and
        listed in ``self.skipped``)."""
        from FMOneShotLib import mrml

        self.skipped = []
        if parameters.applyToAll:
            nodes, self.skipped = mrml.volume_targets(slicer.mrmlScene)
            return nodes
        return [parameters.targetVolume] if parameters.targetVolume else []

    def apply(self, parameters, progress=None, cancel=None):
        """Apply to the target volume (or all): the list of NodeResult, or None when cancelled (nothing added).

        The fit and each volume's computation (its alignment, every slice) run in a worker thread
        (``runWhileResponsive``) while this thread calls, every 50 ms, ``progress(volume_index, n_volumes, done,
        total, name)`` with the latest step and ``cancel()`` (both may touch Qt and process events). The worker
        only records its steps and reads whether ``cancel()`` said True: it touches no Qt object and no MRML node
        (the volumes are converted, and the result nodes made, in this thread)."""
        from FMOneShotLib import mrml
        from FMOneShotLib.pipeline import Cancelled

        template = self.template(parameters)
        options = self.options(parameters)
        nodes = mrml.check_targets(self.targets(parameters))  # bad targets refused before the models load
        state = {"step": None, "cancelled": False}

        def poll():  # this thread
            step, state["step"] = state["step"], None
            if step is not None and progress is not None:
                progress(*step)
            if cancel is not None and cancel():
                state["cancelled"] = True

        def record(*step):  # the worker
            state["step"] = step

        try:
            oneshot = self.fitted(template, options, poll=poll)
            return mrml.apply_to_nodes(template, nodes, progress=record, cancel=lambda: state["cancelled"],
                                       oneshot=oneshot, per_slice_landmarks=parameters.perSliceLandmarks,
                                       run=lambda work: runWhileResponsive(work, poll))
        except Cancelled:
            return None

    def fitted(self, template, options, poll=None):
        """``OneShot(template, **options)`` fitted (models loaded, template features, adapter trained) in a
        worker thread, while this thread keeps the panel responsive: ``poll()`` (which processes Qt events) is
        called every 50 ms until the fit ends. The fit itself cannot be interrupted: a Cancel pressed during it
        takes effect when it ends. The fit touches no MRML node and no Qt object. A backend or segmenter whose
        optional package is missing (sd, sam2) is refused first (``mrml.check_extras``)."""
        from FMOneShotLib import mrml

        mrml.check_extras(options["backend"], options["segmenter"])  # sd, sam2: their packages, before any work
        from FMOneShotLib.pipeline import OneShot

        oneshot = OneShot(template, **options)
        return runWhileResponsive(oneshot.fit, poll or slicer.app.processEvents)

    def summary(self, outputs):
        text = "Done. " + "; ".join(out.summary() for out in outputs)
        if self.skipped:
            text += ". Skipped: " + "; ".join(f"{name} ({why})" for name, why in self.skipped)
        return text

    # ------------------------------------------------------------------ export
    def resultSegmentations(self):
        """Every segmentation FMOneShot made in the scene (of this Apply and earlier ones)."""
        from FMOneShotLib import mrml

        return mrml.result_segmentations(slicer.mrmlScene)

    def existingExports(self, folder, fmt):
        from FMOneShotLib import mrml

        return [str(p) for p in mrml.export_paths(self.resultSegmentations(), folder, fmt) if p.exists()]

    def export(self, folder, fmt, overwrite=False):
        """Every FMOneShot result segmentation written to ``folder`` in format ``fmt`` (mrml.EXPORT_FORMATS).
        DICOM SEG (".seg.dcm") references the images each volume was loaded from, found in Slicer's DICOM
        database: ``slicer.dicomDatabase``, the application's ctkDICOMDatabase, which the DICOM module sets
        at start-up (Slicer 5.8 and later); None where it is missing, which the library refuses clearly."""
        from FMOneShotLib import mrml

        paths = mrml.export_segmentations(self.resultSegmentations(), folder, fmt, overwrite=overwrite,
                                          dicom_database=getattr(slicer, "dicomDatabase", None))
        qt.QSettings().setValue(self.EXPORT_SETTING, str(folder))
        return paths

    # ------------------------------------------------------------------ weights
    def checkpointNames(self):
        from FMOneShotLib import weights

        return list(weights.REGISTRY)

    def downloadWeights(self, name, parent=None):
        """Verified download into the weights folder with a progress dialog that can be cancelled."""
        from FMOneShotLib import weights

        entry = weights.checkpoint(name)
        accept = False
        if entry.opt_in:
            accept = slicer.util.confirmOkCancelDisplay(f"{name} is under the licence: {entry.licence}.\n\nAccept it?")
            if not accept:
                return None
        dialog = qt.QProgressDialog(f"Downloading {name}...", "Cancel", 0, 1000, parent)
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.show()

        def update(done, total):
            dialog.setValue(int(1000 * done / total) if total else 0)
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise RuntimeError("Download cancelled; the partial file is kept and the next download resumes.")

        try:
            return weights.download(name, progress=update, accept_licence=accept)
        finally:
            dialog.close()

    def importWeights(self, source, name):
        from FMOneShotLib import weights

        return weights.import_file(source, name)


def runWhileResponsive(work, poll, interval=0.05):
    """``work()`` run in a worker thread while the calling (main) thread calls ``poll()`` every ``interval``
    seconds until it ends; its value returned, its exception raised here. For work that touches no Qt object
    and no MRML node (PyTorch releases the GIL while it computes, and ``Thread.join`` releases it while the main
    thread waits, so the panel repaints and Cancel can be pressed).

    Log records the worker emits are held back and handled in the calling thread at the next poll: Slicer's
    root logger (level DEBUG) has a handler that writes each record into the application's error-log model
    (``slicer.app.errorLogModel().addEntry`` in slicer/slicerqt.py's SlicerApplicationLogHandler), a Qt object
    that must not be touched from another thread. Printed output needs nothing: PythonQt turns it into signals,
    which Qt queues to the main thread."""
    import logging
    import queue
    import threading

    outcome = {}
    held = queue.SimpleQueue()

    def run():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the main thread as it is
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="FMOneShot work", daemon=True)

    class HoldWorkerRecords(logging.Filter):
        def filter(self, record):
            if record.thread != worker.ident or getattr(record, "fmoneshotReleased", False):
                return True
            if not getattr(record, "fmoneshotHeld", False):  # once, whichever of the handlers sees it first
                record.fmoneshotHeld = True
                held.put(record)
            return False

    def release():
        while True:
            try:
                record = held.get_nowait()
            except queue.Empty:
                return
            record.fmoneshotReleased = True
            logging.getLogger(record.name).handle(record)

    handlers = set(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        handlers.update(getattr(logger, "handlers", ()))  # placeholders have none
    hold = HoldWorkerRecords()
    for handler in handlers:
        handler.addFilter(hold)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(interval)
            release()
            poll()
    finally:
        for handler in handlers:
            handler.removeFilter(hold)
        release()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _pytorchUtils():
    """The PyTorch extension's module (PyTorchUtils), or None when the extension is not installed."""
    try:
        import PyTorchUtils
    except ImportError:
        return None
    return PyTorchUtils


class _busy:
    """A wait cursor and a status message while a blocking step runs."""

    def __init__(self, message):
        self.message = message

    def __enter__(self):
        slicer.util.showStatusMessage(self.message)
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)

    def __exit__(self, *exc):
        qt.QApplication.restoreOverrideCursor()
        slicer.util.showStatusMessage("")


class FMOneShotTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: Slicer --python-code "import FMOneShot; FMOneShot.FMOneShotTest().runTest()", or
    ctest -R py_FMOneShot in the extension's build tree."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_sample_ct()

    def test_sample_ct(self):
        """Liver and spleen clicked and painted on the bundled CT in the scene are found on all slices."""
        # Dependencies first: every import below may need PyTorch or scipy.
        self.assertTrue(FMOneShotLogic().ensureDependencies(ask=False))
        import numpy as np

        from FMOneShotLib import mrml
        from FMOneShotLib.datasets import load_dataset
        from FMOneShotLib.demo import SAMPLE, choose_template_slice
        from FMOneShotLib.metrics import dice
        from FMOneShotLib.template import Label, sample_prompts

        if not os.path.isdir(SAMPLE):
            self.skipTest(f"sample data not found at {SAMPLE}")
        case = load_dataset(SAMPLE).cases[0]
        volume = case.read_image()
        reference = case.read_mask(volume)
        node = mrml.node_from_volume(slicer.mrmlScene, volume, name="sample CT")
        node.CreateDefaultDisplayNodes()
        slicer.util.setSliceViewerLayers(background=node, fit=True)
        values = {"liver": 5, "spleen": 1}
        z = choose_template_slice(reference, list(values.values()))
        one_slice = np.zeros_like(reference)
        one_slice[z] = np.where(np.isin(reference[z], list(values.values())), reference[z], 0)
        painted = mrml.segmentation_from_labels(slicer.mrmlScene, volume.like(one_slice),
                                                [Label(n, v) for n, v in values.items()], node, "painted")
        for name, value in values.items():  # what a radiologist clicks, placed as control points
            positive, negative = mrml.add_label(slicer.mrmlScene, name)
            pos, neg = sample_prompts(reference[z] == value, 5, 5, 0)
            for markups, points in ((positive, pos), (negative, neg)):
                for x, y in points:
                    markups.AddControlPoint(*mrml.index_to_ras(volume, (x, y, z)).tolist())
        logic = FMOneShotLogic()
        parameters = logic.getParameterNode()
        parameters.templateVolume = node
        parameters.targetVolume = node
        parameters.paintedSegmentation = painted
        parameters.backend = "offline"
        self.delayDisplay("Applying")
        (out,) = logic.apply(parameters)
        labels = mrml.labels_from_segmentation(out.segmentation, logic.template(parameters).labels, node).array
        for i, (name, value) in enumerate(values.items()):
            on = [k for k in range(volume.n_slices) if (reference[k] == value).any()]
            score = float(np.mean([dice(labels[k] == i + 1, reference[k] == value) for k in on]))
            self.assertGreaterEqual(score, 0.8, name)
        self.delayDisplay("FMOneShot sample CT test passed")
