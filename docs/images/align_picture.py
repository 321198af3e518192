"""docs/images/align-before-after.png: the sample CT's slice 24 as template, over a target made from it by a
known similarity transform (rotated 8 degrees, scaled 1.1, shifted), before and after the align stage."""
import numpy as np, SimpleITK as sitk
from scipy import ndimage as ndi
from FMOneShotLib.align import align
from FMOneShotLib.datasets import load_dataset
from FMOneShotLib.demo import SAMPLE
from FMOneShotLib.image import Volume, normalize, CT_WINDOW
from FMOneShotLib.viz import write_png
case = load_dataset(SAMPLE).cases[0]
ct, ref = case.read_image(), case.read_mask()
img = ct.array[24].astype(np.float32)
liver = ref[24] == 5
sp = ct.spacing[:2]
tpl = Volume(img, spacing=(sp[0], sp[1], 1.0), modality="CT")
t = sitk.Similarity2DTransform(1.1, np.deg2rad(8), (12.0, -9.0), tuple(tpl.index_to_physical([60, 50, 0])[:2]))
s = tpl.to_sitk()
tgt_img = sitk.GetArrayFromImage(sitk.Resample(s, s, t, sitk.sitkLinear, -1000.0))
tgt = Volume(tgt_img, spacing=(sp[0], sp[1], 1.0), modality="CT")
a = align(tpl, tgt, "affine")
ys, xs = np.nonzero(liver & ~ndi.binary_erosion(liver))
edge_t = np.c_[xs, ys, np.zeros(len(xs))]
def picture(points):
    grey = normalize(tgt.array[0], CT_WINDOW)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, -1)
    p = np.round(points[:, :2]).astype(int)
    ok = (p[:, 0] >= 0) & (p[:, 0] < rgb.shape[1]) & (p[:, 1] >= 0) & (p[:, 1] < rgb.shape[0])
    rgb[p[ok, 1], p[ok, 0]] = (255, 80, 40)
    return np.kron(rgb, np.ones((3, 3, 1), np.uint8))[::-1]  # 3x, anterior at the top
before = picture(edge_t)
after = picture(a.map_index(tpl, tgt, edge_t))
gap = np.full((before.shape[0], 6, 3), 255, np.uint8)
write_png(np.concatenate([before, gap, after], 1), "docs/images/align-before-after.png")
print("NMI", round(a.quality_before, 3), "->", round(a.quality, 3), a.kept, f"{a.seconds:.2f} s")
