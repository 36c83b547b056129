"""nearfar.views: batched augmentations, pipelines, pairs, building from dicts, the grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nearfar.views import (
    OPS,
    ColorJitter,
    Compose,
    GaussianBlur,
    GaussianNoise,
    HorizontalFlip,
    RandomAffine,
    RandomGrayscale,
    RandomResizedCrop,
    Solarize,
    TwoViews,
    apply_geometry,
    build_pipeline,
    build_two_views,
    default_mnist_pipeline,
    default_mnist_views,
    save_pair_grid,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gray():
    return torch.rand(16, 1, 12, 10, generator=gen(1))


@pytest.fixture
def rgb():
    return torch.rand(16, 3, 12, 12, generator=gen(2))


def every_op(p: float = 1.0):
    return [
        RandomResizedCrop(scale=(0.3, 1.0), p=p),
        HorizontalFlip(p=p),
        RandomAffine(degrees=20, translate=(0.1, 0.2), scale=(0.9, 1.1), shear=5, p=p),
        ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=p),
        RandomGrayscale(p=p),
        GaussianBlur(sigma=(0.5, 1.5), p=p),
        Solarize(threshold=0.5, p=p),
        GaussianNoise(std=(0.02, 0.1), p=p),
    ]


@pytest.mark.parametrize("op", every_op(), ids=lambda op: op.name)
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_ranges_and_determinism(op, channels, gray, rgb):
    x = gray if channels == 1 else rgb
    out = op(x, gen(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6
    assert torch.equal(out, op(x, gen(7)))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", every_op(p=0.0), ids=lambda op: op.name)
def test_p_zero_is_identity(op, rgb):
    assert torch.equal(op(rgb, gen(0)), rgb)
    assert torch.equal(Compose([op, op])(rgb, gen(0)), rgb)


def test_uint8_input_is_scaled(gray):
    u8 = (gray * 255).round().to(torch.uint8)
    out = Compose([Solarize(p=0.0)])(u8)
    assert out.dtype == torch.float32 and torch.allclose(out, u8.float() / 255)


@pytest.mark.parametrize("op", [op for op in every_op() if op.name != "random_grayscale"],
                         ids=lambda op: op.name)
def test_images_in_a_batch_get_different_parameters(op):
    # the same image repeated: every copy should come out differently
    one = torch.rand(1, 3, 12, 12, generator=gen(3))
    if op.name in ("horizontal_flip", "solarize"):  # only the apply coin is random
        x = one.expand(64, -1, -1, -1).contiguous()
        out = op.__class__(p=0.5)(x, gen(0))
        changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-6
        assert 0 < int(changed.sum()) < 64
        assert len(torch.unique(out.flatten(1), dim=0)) == 2
        return
    x = one.expand(8, -1, -1, -1).contiguous()
    out = op(x, gen(0))
    assert len(torch.unique(out.flatten(1), dim=0)) == len(x)


def test_identity_crop_returns_input(rgb):
    out = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(rgb, gen(0))
    assert torch.allclose(out, rgb, atol=1e-5)
    same = RandomAffine(degrees=0, translate=(0, 0))(rgb, gen(0))
    assert torch.allclose(same, rgb, atol=1e-5)


def test_geometry_conventions(rgb):
    assert torch.allclose(HorizontalFlip(p=1.0)(rgb), rgb.flip(-1), atol=1e-6)
    rot = RandomAffine(degrees=(90, 90))(rgb)  # counter-clockwise on screen
    assert torch.allclose(rot, torch.rot90(rgb, 1, dims=(2, 3)), atol=1e-5)
    # half a turn of a non-square image is both flips (checks the pixel-aspect handling)
    tall = torch.rand(4, 2, 12, 7, generator=gen(9))
    half_turn = RandomAffine(degrees=(180, 180))(tall)
    assert torch.allclose(half_turn, tall.flip(-1).flip(-2), atol=1e-5)
    flip2 = Compose([HorizontalFlip(p=1.0), HorizontalFlip(p=1.0)])(rgb)
    assert torch.allclose(flip2, rgb, atol=1e-6)


def test_crop_size_changes_output_and_fuses(rgb):
    op = RandomResizedCrop(scale=(0.5, 1.0), size=(6, 8))
    assert op(rgb, gen(0)).shape == (16, 3, 6, 8)
    pipe = Compose([op, RandomAffine(degrees=10)])
    assert pipe(rgb, gen(0)).shape == (16, 3, 6, 8)
    # fused geometry draws the same parameters as applying ops one at a time
    fused = apply_geometry(rgb, [HorizontalFlip(p=1.0), RandomAffine(degrees=(90, 90))], None)
    separate = RandomAffine(degrees=(90, 90))(HorizontalFlip(p=1.0)(rgb))
    assert torch.allclose(fused, separate, atol=1e-5)


def test_crop_stays_inside_image():
    # a constant image cropped anywhere inside stays constant (no zero padding)
    x = torch.full((64, 1, 10, 14), 0.7)
    out = RandomResizedCrop(scale=(0.08, 1.0), ratio=(0.3, 3.0))(x, gen(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_color_ops_on_gray_and_rgb(gray, rgb):
    sat_hue = ColorJitter(saturation=0.8, hue=0.3, p=1.0)
    assert torch.equal(sat_hue(gray, gen(0)), gray)  # no-ops on 1 channel
    assert not torch.equal(sat_hue(rgb, gen(0)), rgb)
    g = RandomGrayscale(p=1.0)(rgb)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.equal(RandomGrayscale(p=1.0)(gray), gray)
    s = Solarize(threshold=0.5, p=1.0)(rgb)
    assert torch.allclose(s, torch.where(rgb >= 0.5, 1 - rgb, rgb))
    hue_only = ColorJitter(hue=(0.0, 0.0), brightness=(1.0, 1.0), p=1.0)
    assert torch.equal(hue_only(rgb, gen(0)), rgb)


def test_blur_preserves_constant_and_smooths():
    const = torch.full((4, 2, 9, 9), 0.3)
    assert torch.allclose(GaussianBlur(sigma=2.0, p=1.0)(const, gen(0)), const, atol=1e-6)
    noisy = torch.rand(8, 1, 16, 16, generator=gen(4))
    blurred = GaussianBlur(sigma=(1.0, 2.0), p=1.0)(noisy, gen(0))
    assert float(blurred.std()) < 0.6 * float(noisy.std())
    # the blur matches a reference 2-D convolution for a fixed sigma
    sigma, k = 1.0, 7
    t = torch.arange(k, dtype=torch.float32) - k // 2
    w = torch.exp(-(t**2) / (2 * sigma**2))
    w = w / w.sum()
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(noisy, (3, 3, 3, 3), mode="reflect"), torch.outer(w, w)[None, None]
    )
    ours = GaussianBlur(sigma=1.0, kernel_size=7, p=1.0)(noisy, gen(0))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_noise_has_requested_std():
    x = torch.full((4, 1, 64, 64), 0.5)
    out = GaussianNoise(std=0.05, p=1.0)(x, gen(0))
    assert abs(float((out - x).std()) - 0.05) < 0.005


def test_two_views_independent_and_deterministic(gray):
    views = TwoViews(Compose(every_op(p=1.0)[:3]))
    a1, a2 = views(gray, gen(5))
    b1, b2 = views(gray, gen(5))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    sep = TwoViews([{"name": "noise", "std": 0.1, "p": 1.0}], [{"name": "flip", "p": 1.0}])
    v1, v2 = sep(gray, gen(0))
    assert torch.allclose(v2, gray.flip(-1), atol=1e-6) and not torch.equal(v1, gray)
    d = sep.describe()
    assert d["shared_pipeline"] is False and d["view_2"] == [{"name": "horizontal_flip", "p": 1.0}]


def test_build_pipeline_round_trip_and_describe():
    pipe = build_pipeline([
        {"name": "random_resized_crop", "scale": [0.4, 1.0]},
        {"name": "noise", "std": 0.05},
        {"name": "affine", "degrees": 10},
    ])
    d = pipe.describe()
    assert [op["name"] for op in d] == ["random_resized_crop", "gaussian_noise", "random_affine"]
    assert d[0]["scale"] == [0.4, 1.0] and d[0]["p"] == 1.0 and "size" not in d[0]
    assert d[1]["std"] == [0.05, 0.05]
    assert d[2]["degrees"] == [-10.0, 10.0]
    rebuilt = build_pipeline(d)
    x = torch.rand(4, 1, 8, 8, generator=gen(0))
    assert rebuilt.describe() == d and torch.equal(rebuilt(x, gen(1)), pipe(x, gen(1)))
    views = default_mnist_views()
    again = build_two_views(views.describe())
    assert again.describe() == views.describe() and again.shared


def test_build_pipeline_errors():
    with pytest.raises(ValueError, match=r"views\[0\]: unknown view op 'zoom'.*gaussian_blur"):
        build_pipeline([{"name": "zoom"}])
    with pytest.raises(ValueError, match=r"views\[1\] \(gaussian_noise\): unknown parameter "
                                         r"'sd'; allowed: std, p"):
        build_pipeline([{"name": "flip"}, {"name": "noise", "sd": 0.1}])
    with pytest.raises(ValueError, match=r"views\[0\]: random_resized_crop.scale: expected"):
        build_pipeline([{"name": "random_resized_crop", "scale": [0.0, 1.0]}])
    with pytest.raises(ValueError, match=r"color_jitter.p: expected a probability"):
        build_pipeline([{"name": "color_jitter", "p": 2}])
    with pytest.raises(ValueError, match="missing 'name'"):
        build_pipeline([{"std": 0.1}])
    with pytest.raises(ValueError, match="expected a list of op tables"):
        build_pipeline({"name": "noise"})
    with pytest.raises(ValueError, match="kernel_size: expected an odd integer"):
        GaussianBlur(kernel_size=4)


def test_every_registered_op_describes_itself():
    for name, cls in OPS.items():
        d = cls().describe()
        assert d["name"] == name and "p" in d
        assert build_pipeline([d]).describe() == [d]


def test_bad_batches_have_clear_errors():
    with pytest.raises(ValueError, match=r"4-D image batch.*unsqueeze"):
        default_mnist_pipeline()(torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match="float batch"):
        HorizontalFlip()(torch.zeros(2, 1, 4, 4, dtype=torch.int32))


def test_default_mnist_views_shape_and_range():
    x = torch.rand(32, 1, 28, 28, generator=gen(0))
    v1, v2 = default_mnist_views()(x, gen(0))
    assert v1.shape == v2.shape == x.shape
    assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0
    names = [op["name"] for op in default_mnist_pipeline().describe()]
    assert "horizontal_flip" not in names


def test_save_pair_grid(tmp_path, rgb, gray):
    path = save_pair_grid(gray, gray.flip(-1), tmp_path / "out" / "pairs.png", nrow=4)
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        # 4 pairs per row, 4 rows, each image enlarged to >= 64 px
        assert img.width > 4 * 2 * 64 and img.height > 4 * 64
    save_pair_grid(rgb, rgb, tmp_path / "rgb.png", nrow=8, max_pairs=8)
    with pytest.raises(ValueError, match="images_2: expected 16 images"):
        save_pair_grid(rgb, rgb[:3], tmp_path / "bad.png")


def test_fast_affine_grid_matches_torch():
    from nearfar.views.geometry import _affine_grid

    theta = torch.randn(3, 2, 3, generator=gen(0))
    for h, w in [(5, 9), (28, 28), (2, 3)]:
        ref = torch.nn.functional.affine_grid(theta, [3, 1, h, w], align_corners=True)
        assert torch.allclose(_affine_grid(theta, (h, w)), ref, atol=1e-6)
