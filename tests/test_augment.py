"""fedxray.augment against oracles: torchvision's affine/rotate, hand-placed impulses, whole-pixel
shifts, the brightness/contrast formula in gray space; and a Client that trains with it."""
import pytest
import torch
from torch.utils.data import Subset
from torchvision.transforms.v2 import functional as TF

from fedxray import Client, NIHDataset, build_model
from fedxray.augment import PARAMS, Augmentation
from fedxray.data import IMAGENET_MEAN, IMAGENET_STD
from fedxray.model import exchanged_keys, get_state

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
OFF = Augmentation(rotation_deg=0, scale=0, translate=0, brightness=0, contrast=0)
# Comparisons in gray [0, 1] after a float32 warp: the two sides sample the same bilinear
# interpolant at grid coordinates that differ only by float32 rounding (~1e-6 px for images of
# tens of pixels); with at most a unit change of gray per pixel, plus the ~1e-7 rounding of
# normalising and de-normalising, 2e-5 is loose enough for rounding and far below any real error
# (a wrong angle, sign or half-pixel offset moves values by 1e-2 or more).
TOL = 2e-5


def normalised(gray):
    """gray [B, 1, H, W] in [0, 1] -> fedxray's model input [B, 3, H, W] (float32)."""
    return ((gray.double().expand(-1, 3, -1, -1) - MEAN) / STD).float()


def to_gray(x):
    """Model input -> de-normalised channels [B, 3, H, W] (float64), one gray image each if all is well."""
    return x.double() * STD + MEAN


def params(b, angle=0.0, scale=1.0, tx=0.0, ty=0.0, brightness=1.0, contrast=1.0):
    return torch.tensor([[angle, scale, tx, ty, brightness, contrast]] * b, dtype=torch.float64)


def test_params_columns_are_named():
    assert PARAMS == ("angle_deg", "scale", "translate_x", "translate_y", "brightness", "contrast")


def test_zero_magnitudes_return_x_itself():
    x = normalised(torch.rand(4, 1, 16, 16))
    before = x.clone()
    assert OFF(x, torch.Generator().manual_seed(0)) is x
    assert Augmentation.apply(x, params(4)) is x
    assert torch.equal(x, before)   # bit for bit, and untouched


@pytest.mark.parametrize("angle, scale, tx, ty", [(7.0, 1.0, 0.0, 0.0), (-30.0, 1.1, 0.1, -0.05),
                                                  (90.0, 0.9, -0.07, 0.03)])
def test_warp_matches_torchvision_affine(angle, scale, tx, ty):
    """Non-square, so that the pixel/normalised-coordinate conversion is checked per axis.
    torchvision's affine() counts angles clockwise (rotate() counter-clockwise, as we do) and
    translates in pixels; fill=None is grid_sample's zero padding, black in gray space. (With
    fill=0 torchvision multiplies edge pixels by its sampled mask a second time.)"""
    h, w = 20, 28
    gray = torch.rand(3, 1, h, w, generator=torch.Generator().manual_seed(1))
    out = to_gray(Augmentation.apply(normalised(gray), params(3, angle, scale, tx, ty)))
    ref = TF.affine(gray, angle=-angle, translate=[tx * w, ty * h], scale=scale, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR, fill=None).double()
    for c in range(3):
        torch.testing.assert_close(out[:, c:c + 1], ref, atol=TOL, rtol=0)


def test_pure_rotation_matches_torchvision_rotate():
    gray = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    out = to_gray(Augmentation.apply(normalised(gray), params(2, angle=7.0)))
    ref = TF.rotate(gray, angle=7.0, interpolation=TF.InterpolationMode.BILINEAR, fill=None).double()
    torch.testing.assert_close(out[:, :1], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("h, w, src, dst", [
    (9, 9, (2, 6), (2, 2)),     # up-right of the centre (4, 4) goes to up-left: counter-clockwise
    (9, 13, (1, 7), (3, 3)),    # centre (4, 6): offset (dx, dy) = (1, -3) -> (dy, -dx) = (-3, -1)
])
def test_quarter_turn_moves_an_impulse_where_computed_by_hand(h, w, src, dst):
    gray = torch.zeros(1, 1, h, w)
    gray[0, 0, src[0], src[1]] = 1.0
    out = to_gray(Augmentation.apply(normalised(gray), params(1, angle=90.0)))
    expected = torch.zeros(1, 1, h, w, dtype=torch.float64)
    expected[0, 0, dst[0], dst[1]] = 1.0
    torch.testing.assert_close(out, expected.expand(-1, 3, -1, -1), atol=TOL, rtol=0)


def test_whole_pixel_translation_is_a_shift_with_black_coming_in():
    h, w = 20, 28
    gray = 0.2 + 0.8 * torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(3))   # no black inside
    out = to_gray(Augmentation.apply(normalised(gray), params(2, tx=3 / w, ty=-2 / h)))    # 3 px right, 2 up
    expected = torch.zeros(2, 1, h, w, dtype=torch.float64)
    expected[:, :, :h - 2, 3:] = gray[:, :, 2:, :w - 3].double()
    torch.testing.assert_close(out, expected.expand(-1, 3, -1, -1), atol=TOL, rtol=0)


def test_padding_is_black_not_the_normalised_zero():
    """A white film turned 45 degrees: its corners now lie outside the source and read gray 0
    (plain zero padding in normalised space would give ImageNet's mean gray, ~0.45)."""
    out = to_gray(Augmentation.apply(normalised(torch.ones(1, 1, 16, 16)), params(1, angle=45.0)))
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        torch.testing.assert_close(out[0, :, i, j], torch.zeros(3, dtype=torch.float64), atol=TOL, rtol=0)
    torch.testing.assert_close(out[0, :, 8, 8], torch.ones(3, dtype=torch.float64), atol=TOL, rtol=0)


def test_brightness_and_contrast_act_on_one_gray_image():
    """gray g -> brightness * (mu + contrast * (g - mu)), mu the image's own mean gray; the three
    de-normalised channels stay one gray image."""
    gray = 0.3 + 0.4 * torch.rand(3, 1, 12, 10, generator=torch.Generator().manual_seed(4))   # no clamping
    p = params(3)
    p[:, 4] = torch.tensor([0.9, 1.0, 1.1], dtype=torch.float64)
    p[:, 5] = torch.tensor([1.1, 0.9, 1.0], dtype=torch.float64)
    out = to_gray(Augmentation.apply(normalised(gray), p))
    g = gray.double()
    mu = g.mean(dim=(-2, -1), keepdim=True)
    b, c = p[:, 4].view(-1, 1, 1, 1), p[:, 5].view(-1, 1, 1, 1)
    expected = b * (mu + c * (g - mu))
    for ch in range(3):
        torch.testing.assert_close(out[:, ch:ch + 1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1:], out[:, :1].expand(-1, 2, -1, -1), atol=1e-6, rtol=0)
    # the mean is kept by contrast alone and scaled by brightness alone
    torch.testing.assert_close(out.mean(dim=(-2, -1)), (b * mu).view(-1, 1).expand(-1, 3), atol=1e-6, rtol=0)


def test_gray_is_clamped_to_the_film_range():
    gray = torch.tensor([[[[0.0, 0.5], [0.95, 1.0]]]])
    out = to_gray(Augmentation.apply(normalised(gray), params(1, brightness=1.5)))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.75], [1.0, 1.0]], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_same_seed_same_output_other_seed_other_output():
    x = normalised(torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(5)))
    aug = Augmentation()
    a = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(7)))
    assert not torch.allclose(a, aug(x, torch.Generator().manual_seed(8)), atol=1e-3)
    assert torch.equal(a, Augmentation.apply(x, aug.draw(4, torch.Generator().manual_seed(7))))


def test_draws_cover_their_ranges_and_no_more():
    aug = Augmentation(rotation_deg=7, scale=0.1, translate=0.06, brightness=0.1, contrast=0.2)
    p = aug.draw(20_000, torch.Generator().manual_seed(0))
    assert p.shape == (20_000, 6) and p.dtype == torch.float64 and p.device.type == "cpu"
    for col, centre, m in zip(p.T, (0, 1, 0, 0, 1, 1), (7, 0.1, 0.06, 0.06, 0.1, 0.2)):
        assert col.min() >= centre - m and col.max() <= centre + m
        assert col.min() < centre - 0.99 * m and col.max() > centre + 0.99 * m   # the whole range is used
        assert abs(col.mean().item() - centre) < 0.02 * m                       # uniform about the centre
    assert torch.corrcoef(p.T).fill_diagonal_(0).abs().max() < 0.05              # drawn independently


def test_turning_one_change_off_keeps_the_others_draws():
    full = Augmentation().draw(16, torch.Generator().manual_seed(1))
    no_rotation = Augmentation(rotation_deg=0).draw(16, torch.Generator().manual_seed(1))
    assert torch.equal(no_rotation[:, 1:], full[:, 1:]) and (no_rotation[:, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_shape_are_kept(dtype):
    x = normalised(torch.rand(2, 1, 18, 22)).to(dtype)
    out = Augmentation()(x, torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device


def test_channels_last_in_channels_last_out():
    x = normalised(torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(6)))
    cl = x.contiguous(memory_format=torch.channels_last)
    out = Augmentation()(cl, torch.Generator().manual_seed(2))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, Augmentation()(x, torch.Generator().manual_seed(2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("field, value", [("rotation_deg", -1.0), ("rotation_deg", 181), ("scale", 1.0),
                                          ("translate", float("nan")), ("brightness", 1.0),
                                          ("contrast", 1.5), ("scale", "0.1"), ("translate", True)])
def test_bad_magnitudes_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"Augmentation.{field} "):
        Augmentation(**{field: value})


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        Augmentation()(torch.zeros(2, 1, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="params must be"):
        Augmentation.apply(torch.zeros(2, 3, 8, 8), params(3))


@pytest.fixture()
def train_ds64(tiny_splits):
    """4 of the tiny training images at 64 px: one step of batch 4 per fit keeps this test short."""
    return Subset(NIHDataset(tiny_splits["train"], image_size=64, preload=True), range(4))


def _fit(ds, augment, round_num=1):
    torch.manual_seed(0)
    model = build_model(14, weights=None)
    client = Client(0, ds, model, batch_size=4, lr=1e-3, seed=3, augment=augment)
    return client.fit(get_state(model, exchanged_keys(model)), round_num=round_num)


def test_client_trains_with_augmentation_deterministically(train_ds64):
    plain = _fit(train_ds64, None)
    a = _fit(train_ds64, Augmentation())
    b = _fit(train_ds64, Augmentation())
    assert a.train_loss > 0 and a.num_examples == len(train_ds64)
    assert not torch.equal(a.state["fc.weight"], plain.state["fc.weight"])
    assert a.train_loss != plain.train_loss
    for k, v in a.state.items():
        assert torch.equal(v, b.state[k]), k
    assert a.train_loss == b.train_loss
