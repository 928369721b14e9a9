"""Where the model looks: Grad-CAM against hand-set models whose answer is known, the pointing game,
IoU and the centre baseline by hand, box scaling, and the demo's own box file."""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import fedxray
from fedxray import LABELS, demo, read_boxes
from fedxray.data import find_boxes
from fedxray.explain import (centre_iou, centre_pointing, heatmap_iou, image_sizes, localisation_scores,
                             localisation_table, model_input, peaks, pointing_game, scale_boxes)

from conftest import ROOT, SHARED

MASS, NODULE = LABELS.index("Mass"), LABELS.index("Nodule")


class Brightness(nn.Module):
    """A stand-in with what gradcam uses (layer4, fc): layer4's one channel is the mean of input channel
    0 over each stride x stride patch (ReLU'd), and fc reads it with +1 for Mass, -1 for Nodule. Its
    Grad-CAM for Mass is that channel itself, known without any gradient."""

    def __init__(self, stride: int = 16):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv2d(3, 1, stride, stride, bias=False), nn.ReLU())
        self.fc = nn.Linear(1, len(LABELS))
        with torch.no_grad():
            self.layer4[0].weight.zero_()
            self.layer4[0].weight[0, 0] = 1.0 / stride ** 2
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[MASS, 0], self.fc.weight[NODULE, 0] = 1.0, -1.0

    def forward(self, x):
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


def quadrant_images(quadrants, size: int = 64) -> torch.Tensor:
    """float [n, 3, size, size]: zero but for channel 0 = 1 in one quadrant (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right) per image."""
    x = torch.zeros(len(quadrants), 3, size, size)
    h = size // 2
    for i, q in enumerate(quadrants):
        r, c = divmod(q, 2)
        x[i, 0, r * h:(r + 1) * h, c * h:(c + 1) * h] = 1.0
    return x


# --------------------------------------------------------------------------- Grad-CAM

def test_gradcam_lights_the_quadrant_the_hand_set_model_reads():
    pytest.importorskip("captum")
    from fedxray.explain import gradcam
    x = quadrant_images([0, 3, 1])
    maps = gradcam(Brightness(), x, "Mass")
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    # The oracle: layer4's channel (1 in the quadrant's 2 x 2 cells of its 4 x 4 grid), upsampled.
    cells = F.avg_pool2d(x[:, :1], 16)
    expected = F.interpolate(cells, size=(64, 64), mode="bilinear")[:, 0].numpy()
    np.testing.assert_allclose(maps, expected / expected.max(axis=(1, 2), keepdims=True), atol=1e-6)
    for m, q in zip(maps, [0, 3, 1]):
        r, c = divmod(q, 2)
        quadrant = np.zeros((64, 64), bool)
        quadrant[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = True
        assert m[quadrant].max() == 1 and (m[~quadrant] < 0.5).all()     # half the maximum: only there
    x_peak, y_peak = peaks(maps).T
    assert ((x_peak < 32) == np.array([True, False, False])).all() and ((y_peak < 32) == [True, False, True]).all()


def test_gradcam_keeps_only_what_speaks_for_the_finding():
    pytest.importorskip("captum")
    from fedxray.explain import gradcam
    x = quadrant_images([0, 0])
    maps = gradcam(Brightness(), x, ["Mass", "Nodule"])      # one finding per image
    assert maps[0].max() == 1.0
    assert (maps[1] == 0).all()                               # Nodule's evidence is negative: ReLU'd away
    assert np.isnan(peaks(maps)[1]).all()
    assert not pointing_game(maps, [[(0, 0, 64, 64)]] * 2)[1]   # a map of nothing points nowhere
    # Signed: scaled by its range, Nodule's map is Mass's upside down (its evidence is -1 x the same).
    signed = gradcam(Brightness(), x, ["Mass", "Nodule"], relu=False)
    np.testing.assert_allclose(signed[0], maps[0], atol=1e-6)
    np.testing.assert_allclose(signed[1], 1 - maps[0], atol=1e-6)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gradcam_on_chestxrayresnet_is_the_layer4_channel_fc_reads_and_leaves_the_model_as_it_was():
    pytest.importorskip("captum")
    from fedxray.explain import gradcam
    torch.manual_seed(0)
    model = fedxray.build_model(weights=None)
    channel = 7
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[MASS, channel] = 1.0
    gray = np.random.default_rng(0).integers(0, 256, (3, 128, 128), dtype=np.uint8)
    model.train()                                 # as a client leaves it: gradcam must use eval mode
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    maps = gradcam(model, gray, "Mass")
    # The oracle: fc reads one channel with weight 1, so Grad-CAM is that channel (>= 0, 4 x 4 at 128 px).
    with torch.no_grad():
        model.eval()
        act = model.layer4(model.trunk(model_input(gray)))[:, channel:channel + 1]
        model.train()
    expected = F.interpolate(act, size=(128, 128), mode="bilinear")[:, 0].numpy()
    np.testing.assert_allclose(maps, expected / expected.max(axis=(1, 2), keepdims=True), atol=1e-5)
    # Nothing about the model changed: mode, weights and BatchNorm statistics, flags, gradients, hooks.
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_gradcam_works_with_a_frozen_layer4():
    pytest.importorskip("captum")
    from fedxray.explain import gradcam
    torch.manual_seed(1)
    model = fedxray.build_model(weights=None).eval()
    gray = np.random.default_rng(1).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    trainable = gradcam(model, gray, "Effusion")
    model.requires_grad_(False)                    # as a loaded model may come
    frozen = gradcam(model, gray, "Effusion")
    np.testing.assert_allclose(frozen, trainable, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert trainable.shape == (2, 64, 64) and 0 <= trainable.min() and trainable.max() <= 1


def test_gradcam_refuses_bad_input_by_name():
    pytest.importorskip("captum")
    from fedxray.explain import gradcam
    model, x = Brightness(), quadrant_images([0, 1])
    with pytest.raises(ValueError, match=r"'Infiltrate' is not one of the 14 NIH findings.*read_boxes"):
        gradcam(model, x, "Infiltrate")
    with pytest.raises(ValueError, match="3 findings for 2 images"):
        gradcam(model, x, ["Mass"] * 3)
    with pytest.raises(ValueError, match="no images"):
        gradcam(model, x[:0], "Mass")
    with pytest.raises(ValueError, match=r"uint8 grayscale \[n, H, W\] or float \[n, 3, H, W\]"):
        gradcam(model, np.zeros((2, 64, 64), np.float32), "Mass")


def test_fedxray_never_imports_captum_and_gradcam_says_how_to_install_it(monkeypatch):
    code = ("import sys, fedxray, fedxray.explain, fedxray.plots; "
            "assert 'captum' not in sys.modules, 'captum imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    from fedxray.explain import gradcam
    monkeypatch.setitem(sys.modules, "captum", None)           # as if it were not installed
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r"pip install 'captum>=0\.7'"):
        gradcam(Brightness(), quadrant_images([0]), "Mass")


# --------------------------------------------------------------------------- scoring by hand

def test_peaks_break_ties_towards_the_centre_and_find_a_2x2_maps_cell_centre():
    h = np.zeros((1, 8, 8))
    h[0, 0, 0] = h[0, 3, 3] = 1.0                          # two equal maxima: (3, 3) is nearer (4, 4)
    assert peaks(h).tolist() == [[3.5, 3.5]]
    # Bilinear upsampling of a 2 x 2 map leaves a flat 16 x 16 top in its best corner: the winning
    # cell's centre is that top's inner corner.
    cells = torch.tensor([[[[0.2, 0.3], [1.0, 0.1]]]])     # bottom-left wins
    up = F.interpolate(cells, size=(64, 64), mode="bilinear")[:, 0].numpy()
    assert peaks(up).tolist() == [[15.5, 48.5]]


def test_pointing_game_by_hand():
    h = np.zeros((4, 8, 8))
    h[:, 2, 5] = 1.0                                     # the maximum's pixel centre: x 5.5, y 2.5
    boxes = [[(5, 2, 1, 1)],                             # edges included: 5 <= 5.5 <= 6
             [(6, 2, 2, 2)],                             # just right of it
             [(0, 0, 2, 2), (5.5, 2.5, 1, 1)],           # the second of two boxes holds it, at its corner
             np.array([[0, 3, 8, 5]])]                   # just below it
    assert pointing_game(h, boxes).tolist() == [True, False, True, False]


def test_heatmap_iou_by_hand():
    h = np.zeros((2, 4, 4))
    h[:, :2, :2] = [[1.0, 0.6], [0.5, 0.4]]              # >= 0.5 of the maximum: 3 pixels
    boxes = [[(0, 0, 4, 1)], [(0, 0, 4, 1)]]             # row 0: 4 pixels, 2 of them in the region
    assert heatmap_iou(h[:1], boxes[:1]).tolist() == [pytest.approx(2 / 5)]
    assert heatmap_iou(h[:1], boxes[:1], threshold=0.4).tolist() == [pytest.approx(2 / 6)]
    assert heatmap_iou(h[:1], boxes[:1], threshold=1.0).tolist() == [pytest.approx(1 / 4)]
    h[1] = 0
    assert heatmap_iou(h, boxes)[1] == 0.0               # nothing positive: no region
    with pytest.raises(ValueError, match="threshold"):
        heatmap_iou(h, boxes, threshold=0)


def test_centre_baseline_by_hand():
    shape = (10, 10)                                     # the centre: (5, 5)
    assert centre_pointing([[(4, 4, 2, 2)], [(0, 0, 3, 3)], [(0, 0, 5, 5)]], shape).tolist() == [True, False, True]
    # The same box, centred: (2, 4, 4, 2) -> (3, 4, 4, 2); 8 pixels each, 6 shared -> 6 / 10.
    assert centre_iou([[(2, 4, 4, 2)], [(0, 0, 4, 2)], [(3, 4, 4, 2)]], shape).tolist() == \
        [pytest.approx(0.6), 0.0, 1.0]


def test_scoring_refuses_bad_input():
    h = np.ones((2, 8, 8))
    with pytest.raises(ValueError, match="1 box lists for 2 heatmaps"):
        pointing_game(h, [[(0, 0, 1, 1)]])
    with pytest.raises(ValueError, match="heatmap 1 has no box"):
        pointing_game(h, [[(0, 0, 1, 1)], []])
    with pytest.raises(ValueError, match=r"w, h > 0"):
        heatmap_iou(h, [[(0, 0, 1, 1)], [(0, 0, 0, 1)]])
    with pytest.raises(ValueError, match=r"\[n, H, W\] with n >= 1"):
        pointing_game(np.ones((0, 8, 8)), [])


def test_boxes_are_scaled_from_each_images_own_size():
    boxes = pd.DataFrame({"image": ["a.png", "b.png"], "finding": ["Mass", "Nodule"],
                          "x": [512.0, 512.0], "y": [256.0, 256.0], "w": [128.0, 128.0], "h": [64.0, 64.0]})
    scaled = scale_boxes(boxes, {"a.png": (1024, 1024), "b.png": (2048, 512)}, (64, 64))
    assert scaled.loc[0, ["x", "y", "w", "h"]].tolist() == [32, 16, 8, 4]       # NIH's 1024 -> 64
    assert scaled.loc[1, ["x", "y", "w", "h"]].tolist() == [16, 32, 4, 8]       # width and height apart
    assert boxes.loc[0, "x"] == 512                                              # a copy
    with pytest.raises(ValueError, match="no image size for 1 boxed image.*'b.png'"):
        scale_boxes(boxes, {"a.png": (1024, 1024)}, (64, 64))


def test_image_sizes_are_read_from_the_files(tmp_path, nih_sample):
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(tmp_path / "x.png")
    real = sorted(nih_sample.glob("images_*/images/*.png"))[:2]
    assert image_sizes([tmp_path / "x.png", *real]) == [(50, 30), (1024, 1024), (1024, 1024)]


def test_localisation_table_by_hand():
    scores = pd.DataFrame({"image": list("abcde"), "finding": ["Nodule", "Mass", "Mass", "Mass", "Nodule"],
                           "hit": [True, True, False, True, False], "centre_hit": [False, False, False, True, False],
                           "iou": [0.5, 0.2, 0.0, 0.4, 0.1], "centre_iou": [0.0, 0.1, 0.0, 0.2, 0.0]})
    table = localisation_table(scores)
    assert list(table.index) == ["Mass", "Nodule", "all"]                       # LABELS order, then all
    assert list(table.columns) == ["images", "pointing", "pointing (centre)", "IoU", "IoU (centre)"]
    assert table.loc["Mass"].tolist() == pytest.approx([3, 2 / 3, 1 / 3, 0.2, 0.1])
    assert table.loc["Nodule"].tolist() == pytest.approx([2, 0.5, 0.0, 0.3, 0.0])
    assert table.loc["all"].tolist() == pytest.approx([5, 0.6, 0.2, 0.24, 0.06])
    with pytest.raises(ValueError, match="no scores"):
        localisation_table(scores.iloc[:0])


def write_bright_squares(root: Path) -> pd.DataFrame:
    """Three 128-pixel images, each dark but for a bright 32-pixel square, and their metadata."""
    rows = []
    for name, (x, y) in {"a.png": (0, 0), "b.png": (96, 64), "c.png": (32, 96)}.items():
        img = np.zeros((128, 128), np.uint8)
        img[y:y + 32, x:x + 32] = 255
        Image.fromarray(img).save(root / name)
        rows.append({"image": name, "path": str(root / name)})
    return pd.DataFrame(rows)


def test_localisation_scores_point_at_the_bright_square_through_the_scaling(tmp_path):
    pytest.importorskip("captum")
    frame = write_bright_squares(tmp_path)
    # Boxes in the files' 128-pixel space; scored at 64. a: its square; b: its square, and a Nodule box
    # (the evidence for Nodule is against the square: it points elsewhere); c: a box away from its square.
    boxes = pd.DataFrame([("a.png", "Mass", 0, 0, 32, 32), ("b.png", "Mass", 96, 64, 32, 32),
                          ("b.png", "Nodule", 96, 64, 32, 32), ("c.png", "Mass", 64, 0, 40, 40)],
                         columns=["image", "finding", "x", "y", "w", "h"])
    scores = localisation_scores(Brightness(stride=8), frame, boxes, image_size=64)
    assert list(zip(scores["image"], scores["finding"])) == [("a.png", "Mass"), ("b.png", "Mass"),
                                                             ("b.png", "Nodule"), ("c.png", "Mass")]
    assert scores["hit"].tolist() == [True, True, False, False]
    assert scores["centre_hit"].tolist() == [False, False, False, False]
    # The bright square (16 x 16 at 64 px) is the heatmap's region at 0.5, less the few pixels at its
    # inner corners that bilinear upsampling blurs below half (8 for a, 12 for b): IoU with its box.
    # Nodule's region is the rest of the image, those few pixels of b's square aside.
    assert scores["iou"].tolist() == pytest.approx([248 / 256, 244 / 256, 0.0, 0.0], abs=0.005)
    assert scores["boxes"].tolist() == [1, 1, 1, 1]
    assert ((scores["x"] < 16) & (scores["y"] < 16)).iloc[0]     # a's square: the top-left 16 x 16 at 64 px
    table = localisation_table(scores)
    assert table.loc["all", "pointing"] == 0.5 and table.loc["Mass", "images"] == 3
    few = localisation_scores(Brightness(stride=8), frame, boxes, image_size=64, max_images=2, seed=0)
    assert few["image"].nunique() == 2
    relu = localisation_scores(Brightness(stride=8), frame, boxes, image_size=64, relu=True)
    assert relu["hit"].tolist() == scores["hit"].tolist()
    assert np.isnan(relu.loc[2, ["x", "y"]].to_numpy(float)).all()     # Nodule: nothing for it, no point


def test_localisation_scores_refuse_bad_input(tmp_path):
    frame = write_bright_squares(tmp_path)
    boxes = pd.DataFrame([("a.png", "Mass", 0, 0, 32, 32)], columns=["image", "finding", "x", "y", "w", "h"])
    model = Brightness(stride=8)
    stray = pd.concat([boxes, boxes.assign(image="z.png")])
    with pytest.raises(ValueError, match=r"1 boxed image\(s\) are not in frame, first 'z.png'.*isin"):
        localisation_scores(model, frame, stray, 64)
    with pytest.raises(ValueError, match="no boxes to score"):
        localisation_scores(model, frame, boxes.iloc[:0], 64)
    with pytest.raises(ValueError, match="'Infiltrate' is not one of"):
        localisation_scores(model, frame, boxes.assign(finding="Infiltrate"), 64)
    with pytest.raises(ValueError, match="no 'path' column"):
        localisation_scores(model, frame.drop(columns="path"), boxes, 64)
    with pytest.raises(ValueError, match="max_images"):
        localisation_scores(model, frame, boxes, 64, max_images=0)


def test_gradcam_panels_put_boxed_images_and_findings_first_then_the_top_findings(tmp_path):
    pytest.importorskip("captum")
    from fedxray.explain import gradcam_panels
    frame = write_bright_squares(tmp_path)
    boxes = pd.DataFrame([("a.png", "Mass", 0, 0, 32, 32), ("b.png", "Nodule", 96, 64, 32, 32)],
                         columns=["image", "finding", "x", "y", "w", "h"])
    model = Brightness(stride=8).train()
    panels = gradcam_panels(model, frame, 64, boxes, n_images=3, per_image=2, seed=0)
    assert model.training                                          # given back as it came
    names = [t.split("\n")[0] for t in panels["titles"]]
    findings = [t.split("\n")[1].split(" ")[0] for t in panels["titles"]]
    assert set(names[:4]) == {"a.png", "b.png"} and names[4:] == ["c.png", "c.png"]   # boxed images first
    by_image = {n: findings[i:i + 2] for i, n in list(enumerate(names))[::2]}
    # The boxed finding first, then the most likely: Mass (bright), then the first of the findings fc ignores.
    assert by_image == {"a.png": ["Mass", "Atelectasis"], "b.png": ["Nodule", "Mass"], "c.png": ["Mass", "Atelectasis"]}
    boxes_of = {(n, f): b for n, f, b in zip(names, findings, panels["boxes"])}
    assert boxes_of["b.png", "Nodule"].tolist() == [[48, 32, 16, 16]]              # 128 -> 64 pixels
    assert boxes_of["a.png", "Mass"].tolist() == [[0, 0, 16, 16]] and len(boxes_of["c.png", "Mass"]) == 0
    assert panels["images"].shape == panels["heatmaps"].shape == (6, 64, 64)
    mass = panels["heatmaps"][names.index("c.png")]                                # c's square: x 16-31, y 48-63
    x, y = peaks(mass[None])[0]
    assert 16 <= x <= 32 and 48 <= y <= 64
    none = gradcam_panels(model, frame, 64, None, n_images=1, per_image=1)
    assert len(none["titles"]) == 1 and len(none["boxes"][0]) == 0


def test_plot_gradcam_grid_draws_a_panel_per_map_with_its_boxes():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.patches import Rectangle
    from fedxray.plots import plot_gradcam_grid
    images = np.zeros((4, 16, 16), np.uint8)
    maps = np.zeros((4, 16, 16))
    maps[:, 4, 4] = 1
    fig = plot_gradcam_grid(images, maps, list("abcd"), boxes=[[(1, 1, 4, 4)], [], [(0, 0, 2, 2), (8, 8, 2, 2)], []])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and len(fig.axes) == 6                  # 2 rows of 3, the last two empty
    assert [sum(isinstance(p, Rectangle) for p in ax.patches) for ax in panels] == [1, 0, 2, 0]
    assert [ax.get_title() for ax in panels] == list("abcd")
    with pytest.raises(ValueError, match="one title"):
        plot_gradcam_grid(images, maps, ["a"])


# --------------------------------------------------------------------------- the demo's boxes

@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return fedxray.make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=3, num_patients=24,
                                     image_size=64, progress=False)


def test_read_boxes_reads_the_demos_box_file_in_nihs_format(small_demo):
    path = small_demo / "BBox_List_2017.csv"
    lines = path.read_text().split("\n")
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    if (SHARED / "nih-metadata" / "BBox_List_2017.csv").is_file():
        assert lines[0] == (SHARED / "nih-metadata" / "BBox_List_2017.csv").read_text().split("\n")[0]
    assert lines[-1] == "" and all(len(line.split(",")) == 6 for line in lines[1:-1])
    assert "Infiltrate" in {line.split(",")[1] for line in lines[1:-1]}   # NIH's spelling in the file
    boxes = read_boxes(path)
    assert len(boxes) == len(lines) - 2 and len(boxes) > 10
    assert set(boxes["finding"]) <= set(demo.BOX_FINDINGS) and "Infiltration" in set(boxes["finding"])
    test_images = set((small_demo / "test_list.txt").read_text().split("\n"))
    assert set(boxes["image"]) <= test_images                               # test images only, as NIH's
    assert (boxes["x"] + boxes["w"] <= 64).all() and (boxes["y"] + boxes["h"] <= 64).all()
    assert image_sizes(fedxray.load_nih(small_demo).set_index("image").loc[boxes["image"][:3], "path"]) == [(64, 64)] * 3
    assert find_boxes(small_demo) == path


def test_an_empty_box_file_reads_as_no_boxes(tmp_path, caplog):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    with caplog.at_level(logging.WARNING):
        boxes = read_boxes(path)
    assert boxes.empty and list(boxes.columns) == ["image", "finding", "x", "y", "w", "h"]
    assert "no boxes" in caplog.text


def test_find_boxes_beside_the_metadata_or_under_the_search_root(tmp_path, small_demo):
    (tmp_path / "only_csv").mkdir()
    (tmp_path / "only_csv" / "Data_Entry_2017.csv").write_text("x\n")
    assert find_boxes(tmp_path / "only_csv") is None
    kaggle = tmp_path / "input" / "data"
    kaggle.mkdir(parents=True)
    (kaggle / "Data_Entry_2017.csv").write_text("x\n")
    (kaggle / "BBox_List_2017.csv").write_text("x\n")
    assert find_boxes(None, search_root=tmp_path / "input") == kaggle / "BBox_List_2017.csv"
    assert find_boxes(None, search_root=tmp_path / "nothing here") is None


def _drawn_without(name: str):
    """A painter that draws `name` (so every random stream moves on as usual) and then takes it off
    the canvas: the image is the one without the finding, all else equal."""
    real = demo._PAINTERS[name]

    def paint(c, rf, ri):
        add, texture = c.add.copy(), c.texture.copy()
        real(c, rf, ri)
        c.add, c.texture = add, texture
    return paint


@pytest.mark.parametrize("name", demo.BOX_FINDINGS)
def test_the_demos_boxes_hold_what_the_finding_changed(name, monkeypatch):
    # The image with the finding minus the same image without it (every random draw the same): the
    # change lies in the boxes. Measured at 64 px over these 8 patients: 97.1% (Pneumonia) to 99.9%
    # (Mass) of it inside boxes that cover 2.3% (Atelectasis) to 16% (Infiltration) of the image.
    size, inside, outside, box_share = 64, 0.0, 0.0, []
    labels = np.zeros(len(LABELS), np.uint8)
    labels[LABELS.index(name)] = 1
    for patient in range(1, 9):
        anatomy = demo._Anatomy.draw(demo._stream(0, 2, patient, 0))
        view = "AP" if patient % 2 else "PA"
        drawn, signatures = demo._draw(labels, view, anatomy, 0, patient, 0, size)
        boxes = demo._boxes(signatures[name])
        assert boxes, (name, patient)
        with monkeypatch.context() as m:
            if name in demo._PAINTERS:
                m.setitem(demo._PAINTERS, name, _drawn_without(name))
                without = demo._render_image(labels, view, anatomy, 0, patient, 0, size)
            else:                                  # Cardiomegaly: the heart's size, no painter
                without = demo._render_image(np.zeros_like(labels), view, anatomy, 0, patient, 0, size)
        change = np.abs(drawn.astype(float) - without)
        mask = np.zeros((size, size), bool)
        for x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
            mask[y:y + h, x:x + w] = True
        inside += change[mask].sum()
        outside += change[~mask].sum()
        box_share.append(mask.mean())
    assert inside / (inside + outside) >= 0.9, (name, inside / (inside + outside))
    assert np.mean(box_share) <= 0.25, (name, box_share)      # and the boxes are not the whole chest
