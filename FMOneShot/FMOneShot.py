"""FMOneShot: the 3D Slicer module.

Minimal first version: the module registers, its Logic runs the FMOneShotLib chain on a volume node, and the
self-test segments the bundled sample CT. The full panel (clicking prompts in the viewer, batch, export)
follows in the Slicer issue. The Widget stays thin: it maps the UI to Logic calls; the work is in Logic and
FMOneShotLib.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


class FMOneShot(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FMOneShot"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["FMOneShot developers"]
        self.parent.helpText = ("Mark a structure once on a template slice (positive and negative points, or a "
                                "painted segment); FMOneShot finds it on every slice of other volumes.")
        self.parent.acknowledgementText = ("Method: Anand et al. 2023, one-shot localization and segmentation "
                                           "with foundation models; data-adaptive few-shot adapters.")


class FMOneShotWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = FMOneShotLogic()


class FMOneShotLogic(ScriptedLoadableModuleLogic):
    """Runs the FMOneShotLib chain on MRML volume nodes. Imports the library (and torch) only when used."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        # Model weights go to Slicer's cache folder unless the user chose another one (FMOneShotLib.weights).
        os.environ.setdefault("FMONESHOT_CACHE", os.path.join(slicer.app.cachePath, "FMOneShot"))

    def segment(self, template, volume_node, **options):
        """Segment ``volume_node`` with a FMOneShotLib Template; returns the library's Result."""
        from FMOneShotLib.mrml import volume_from_node
        from FMOneShotLib.pipeline import OneShot

        if volume_node is None:
            raise ValueError("Select a target volume first.")
        volume = volume_from_node(volume_node)
        return OneShot(template, **options).fit().apply(volume)


class FMOneShotTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_sample_ct()

    def test_sample_ct(self):
        """Liver and spleen marked on the bundled CT are found on all slices with Dice >= 0.8 / 0.7."""
        import tempfile

        from FMOneShotLib.demo import SAMPLE, run_demo

        data = SAMPLE
        if not os.path.isdir(data):
            self.skipTest(f"sample data not found at {data}")
        report = run_demo(tempfile.mkdtemp(), data=data)
        self.assertGreaterEqual(report.dice["liver"], 0.80)
        self.assertGreaterEqual(report.dice["spleen"], 0.70)
        self.delayDisplay("FMOneShot sample CT test passed")
