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

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.util import VTKObservationMixin

import qt


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


@parameterNodeWrapper
class FMOneShotParameterNode:
    """What the panel shows, saved with the scene. The labels themselves are tagged point lists in the scene
    (FMOneShotLib.mrml.add_label), so they are saved too."""

    templateVolume: slicer.vtkMRMLScalarVolumeNode
    targetVolume: slicer.vtkMRMLScalarVolumeNode
    paintedSegmentation: slicer.vtkMRMLSegmentationNode
    orientation: str = "auto"
    backend: str = "auto"
    adapter: str = "auto"
    augment: bool = False
    segmenter: str = "auto"
    device: str = "auto"
    applyToAll: bool = False
    perSliceLandmarks: bool = False
    exportFormat: str = ".nrrd"


class FMOneShotWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._cancelRequested = False
        self._running = False

    # ------------------------------------------------------------------ set up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FMOneShot.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FMOneShotLogic()

        self.ui.labelsTableWidget.setColumnCount(3)
        self.ui.labelsTableWidget.setHorizontalHeaderLabels(["Label", "Positive", "Negative"])
        self.ui.labelsTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.labelColorPickerButton.color = qt.QColor(221, 130, 101)
        self.ui.weightsComboBox.addItems(self.logic.checkpointNames())

        self.ui.addLabelButton.connect("clicked(bool)", self.onAddLabel)
        self.ui.labelNameLineEdit.connect("returnPressed()", self.onAddLabel)
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
        self.ui.backendComboBox.connect("currentTextChanged(QString)", self.updateBackendStatus)

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
            self._parameterNode.templateVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ------------------------------------------------------------------ labels
    def onNodesChanged(self, caller=None, event=None):
        if not self._running:
            qt.QTimer.singleShot(0, self.refreshLabels)

    def refreshLabels(self):
        """One row per label in the scene: its name and colour, and a place widget per point list."""
        prompts = self.logic.labels()
        table = self.ui.labelsTableWidget
        table.setRowCount(len(prompts))
        for row, prompt in enumerate(prompts):
            item = qt.QTableWidgetItem(prompt.name)
            if prompt.color:
                item.setBackground(qt.QColor(*prompt.color))
            table.setItem(row, 0, item)
            for column, node in ((1, prompt.positive), (2, prompt.negative)):
                place = slicer.qSlicerMarkupsPlaceWidget()
                place.setMRMLScene(slicer.mrmlScene)
                place.buttonsVisible = False
                place.placeButton().show()
                place.deleteButton().show()
                place.setCurrentNode(node)
                table.setCellWidget(row, column, place)
        landmarks = self.logic.landmarksNode()
        self.ui.landmarksPlaceWidget.enabled = landmarks is not None
        if landmarks is not None:
            self.ui.landmarksPlaceWidget.setCurrentNode(landmarks)

    def onAddLabel(self):
        with slicer.util.tryWithErrorDisplay("Could not add the label.", waitCursor=True):
            c = self.ui.labelColorPickerButton.color
            self.logic.addLabel(self.ui.labelNameLineEdit.text, (c.red(), c.green(), c.blue()))
            self.ui.labelNameLineEdit.text = ""
        self.refreshLabels()

    def onRemoveLabel(self):
        row = self.ui.labelsTableWidget.currentRow()
        if row < 0:
            slicer.util.warningDisplay("Select the label to remove in the table first.")
            return
        name = self.ui.labelsTableWidget.item(row, 0).text()
        if slicer.util.confirmOkCancelDisplay(f"Remove the label '{name}' and its points?"):
            self.logic.removeLabel(name)
            self.refreshLabels()

    def onAddLandmarks(self):
        self.ui.landmarksPlaceWidget.setCurrentNode(self.logic.landmarksNode(create=True))
        self.ui.landmarksPlaceWidget.enabled = True

    # ------------------------------------------------------------------ template files
    def onPreviewTemplate(self):
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("Could not preview the template masks.", waitCursor=True):
            preview = self.logic.previewTemplate(self._parameterNode)
            self.ui.statusLabel.text = (f"'{preview.GetName()}' shows the template masks and is now the painted "
                                        "masks: correct it in the Segment Editor, or clear 'Painted masks' to use "
                                        "the clicks again.")

    def onSaveTemplate(self):
        path = qt.QFileDialog.getSaveFileName(self.parent, "Save template", "", "FMOneShot template (*.json)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the template.", waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            force = os.path.exists(path)  # the file dialog has asked already
            self.logic.saveTemplate(self._parameterNode, path, force=force)
            self.ui.statusLabel.text = f"Template saved: {path}"

    def onLoadTemplate(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Load template", "", "FMOneShot template (*.json)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not load the template.", waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            template = self.logic.loadTemplate(path)
            self.ui.templateFileLabel.text = (f"Template: {os.path.basename(path)} "
                                              f"({', '.join(template.label_names + template.landmark_names)})")
            self.ui.clearTemplateButton.enabled = True

    def onClearTemplate(self):
        self.logic.loadedTemplate = None
        self.ui.templateFileLabel.text = "Template: the marks in the scene"
        self.ui.clearTemplateButton.enabled = False

    # ------------------------------------------------------------------ apply
    def updateBackendStatus(self, *args):
        self.ui.backendStatusLabel.text = self.logic.backendStatus(self.ui.backendComboBox.currentText)

    def onApply(self):
        if not self.logic.ensureDependencies():
            return
        self._cancelRequested = False
        self._running = True
        self.ui.applyButton.enabled = False
        self.ui.cancelButton.enabled = True
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
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
            self._running = False
            self.ui.applyButton.enabled = True
            self.ui.cancelButton.enabled = False
            self.ui.progressBar.visible = False
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
        folder = self.ui.exportDirectoryButton.directory
        fmt = self.ui.exportFormatComboBox.currentText
        with slicer.util.tryWithErrorDisplay("Could not export the results.", waitCursor=True):
            existing = self.logic.existingExports(folder, fmt)
            overwrite = False
            if existing:
                if not slicer.util.confirmOkCancelDisplay(
                        "These files exist already:\n" + "\n".join(existing) + "\n\nOverwrite them?"):
                    return
                overwrite = True
            paths = self.logic.export(folder, fmt, overwrite=overwrite)
            self.ui.statusLabel.text = f"Exported {len(paths)} file(s) to {folder}"

    # ------------------------------------------------------------------ weights
    def onDownloadWeights(self):
        name = self.ui.weightsComboBox.currentText
        with slicer.util.tryWithErrorDisplay(f"Could not download {name}.", waitCursor=False):
            path = self.logic.downloadWeights(name, self.parent)
            if path:
                self.ui.weightsStatusLabel.text = f"{name}: verified, {path}"
                self.updateBackendStatus()

    def onImportWeights(self):
        name = self.ui.weightsComboBox.currentText
        source = qt.QFileDialog.getOpenFileName(self.parent, f"Import the checkpoint file of {name}")
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(f"Could not import {name}.", waitCursor=True):
            path = self.logic.importWeights(source, name)
            self.ui.weightsStatusLabel.text = f"{name}: verified and imported to {path}"
            self.updateBackendStatus()


class FMOneShotLogic(ScriptedLoadableModuleLogic):
    """The module's steps in Slicer: asking, installing, progress. The work is FMOneShotLib's."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        # Model weights go to Slicer's cache folder unless the user chose another one (FMOneShotLib.weights).
        os.environ.setdefault("FMONESHOT_CACHE", os.path.join(slicer.app.cachePath, "FMOneShot"))
        self.loadedTemplate = None

    def getParameterNode(self):
        return FMOneShotParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, ask=True):
        """Install what is missing, once and with consent: torch through the PyTorch extension when it is
        there (the build that matches the GPU), the rest with pip. False when the user declined."""
        from FMOneShotLib import requirements

        missing = requirements.missing()
        if not missing:
            return True
        names = ", ".join(requirements.package(r) for r in missing)
        if ask and not slicer.util.confirmOkCancelDisplay(
                f"FMOneShot needs these Python packages, which are not installed yet: {names}.\n\n"
                "Install them now? (Several GB for PyTorch; Slicer may need a restart afterwards.)",
                "FMOneShot: install dependencies"):
            return False
        torch_missing = [r for r in missing if requirements.package(r) in requirements.TORCH]
        if torch_missing:
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torch_logic = PyTorchUtils.PyTorchUtilsLogic()
                if torch_logic.installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension.")
                missing = [r for r in missing if r not in torch_missing]
        if missing:
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(missing, requester="FMOneShot")
            else:
                with _busy("Installing " + names):
                    slicer.util.pip_install(missing)
        still = requirements.missing()
        if still:
            raise RuntimeError(f"Still missing after installing: {', '.join(still)}. Restart Slicer and try again.")
        return True

    # ------------------------------------------------------------------ labels
    def labels(self):
        from FMOneShotLib import mrml

        return mrml.label_prompts(slicer.mrmlScene)

    def addLabel(self, name, color):
        from FMOneShotLib import mrml

        return mrml.add_label(slicer.mrmlScene, name, color)

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

        preview = mrml.preview_template(parameters.templateVolume, self.template(parameters),
                                        **self.options(parameters))
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
                                parameters.augment)

    def backendStatus(self, backend):
        from FMOneShotLib.weights import resolve_backend  # no torch: the panel opens before PyTorch is loaded

        return resolve_backend(backend)[1]

    def targets(self, parameters):
        if parameters.applyToAll:
            nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        return [parameters.targetVolume] if parameters.targetVolume else []

    def apply(self, parameters, progress=None, cancel=None):
        """Apply to the target volume (or all): the list of NodeResult, or None when cancelled (nothing added)."""
        from FMOneShotLib import mrml
        from FMOneShotLib.pipeline import Cancelled

        template = self.template(parameters)
        options = self.options(parameters)
        try:
            return mrml.apply_to_nodes(template, self.targets(parameters), progress=progress, cancel=cancel,
                                       per_slice_landmarks=parameters.perSliceLandmarks, **options)
        except Cancelled:
            return None

    def summary(self, outputs):
        return "Done. " + "; ".join(out.summary() for out in outputs)

    # ------------------------------------------------------------------ export
    def resultSegmentations(self):
        """Every segmentation FMOneShot made in the scene (of this Apply and earlier ones)."""
        from FMOneShotLib import mrml

        return mrml.result_segmentations(slicer.mrmlScene)

    def existingExports(self, folder, fmt):
        from FMOneShotLib import mrml

        return [str(p) for p in mrml.export_paths(self.resultSegmentations(), folder, fmt) if p.exists()]

    def export(self, folder, fmt, overwrite=False):
        from FMOneShotLib import mrml

        return mrml.export_segmentations(self.resultSegmentations(), folder, fmt, overwrite=overwrite)

    # ------------------------------------------------------------------ weights
    def checkpointNames(self):
        from FMOneShotLib import weights

        return list(weights.REGISTRY)

    def downloadWeights(self, name, parent=None):
        """Verified download into Slicer's cache with a progress dialog that can be cancelled."""
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


class _busy:
    """A wait cursor while a blocking step runs."""

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
        import numpy as np

        from FMOneShotLib import mrml
        from FMOneShotLib.datasets import load_dataset
        from FMOneShotLib.demo import SAMPLE, choose_template_slice
        from FMOneShotLib.metrics import dice
        from FMOneShotLib.template import Label, sample_prompts

        if not os.path.isdir(SAMPLE):
            self.skipTest(f"sample data not found at {SAMPLE}")
        self.assertTrue(FMOneShotLogic().ensureDependencies(ask=False))
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
