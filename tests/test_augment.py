"""BYOL's two-view augmentation: crops in the loader, batched photometric ops on the device.

The photometric ops are checked against torchvision's functional ops applied sample by sample
with the same parameters. Tolerances on the [0, 1] scale: 1e-6 for the blends, grayscale,
blur and solarize (float32 rounding only), 1e-5 where the HSV round trip of hue is involved.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from ladder_siam.data import photometric
from ladder_siam.data.crops import TwoViewCrop, ViewCrop, draft_factor, sample_crop_box
from ladder_siam.data.shards import DecodedSample, decode_sample
from ladder_siam.data.tar_shards import Sample
from ladder_siam.prep.scenes import render_scene
from ladder_siam.pretrain.augmentation import (
    BYOL_VIEW_A,
    BYOL_VIEW_B,
    BatchPhotometric,
    PhotometricConfig,
    PhotometricParams,
    TwoViewPhotometric,
    apply_photometric,
    sample_params,
)

CPU = torch.device("cpu")
OFF = PhotometricConfig(jitter_prob=0, grayscale_prob=0, blur_prob=0, solarize_prob=0)
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _sample(width: int = 80, height: int = 60, mode: str = "RGB") -> DecodedSample:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return DecodedSample("k", Image.fromarray(pixels).convert(mode))


def _images(batch: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images on the uint8 grid, where ties between channels and grey pixels occur."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), generator=generator) / 255.0


def test_crop_gives_two_different_uint8_views() -> None:
    torch.manual_seed(0)
    view_a, view_b = TwoViewCrop(32)(_sample())
    assert view_a.shape == view_b.shape == (3, 32, 32)
    assert view_a.dtype == view_b.dtype == torch.uint8
    assert not torch.equal(view_a, view_b)


def test_crop_converts_a_non_rgb_image() -> None:
    view, _ = TwoViewCrop(16)(_sample(mode="L"))
    assert view.shape == (3, 16, 16)
    assert torch.equal(view[0], view[1])


def test_crop_is_deterministic_under_a_seed() -> None:
    crop = TwoViewCrop(32)
    torch.manual_seed(7)
    first = crop(_sample())
    torch.manual_seed(7)
    second = crop(_sample())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_crop_reads_the_sampled_box_and_flips() -> None:
    image = _sample().image
    crop = TwoViewCrop(24, interpolation=Image.Resampling.BILINEAR, reducing_gap=None)
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, height, width = sample_crop_box(
            image.width, image.height, crop.scale, crop.ratio
        )
        flip = torch.rand(1).item() < 0.5
        expected = image.crop((left, top, left + width, top + height))
        expected = expected.resize((24, 24), Image.Resampling.BILINEAR)
        if flip:
            expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        torch.manual_seed(seed)
        view = crop.crop(image).int()
        # torch's antialiased resize is Pillow's, up to the rounding of its coefficients.
        difference = view - torch.from_numpy(np.array(expected)).permute(2, 0, 1).int()
        assert difference.abs().max() <= 1


def test_views_are_torchvisions_random_resized_crop_and_flip() -> None:
    image = _sample(97, 71).image
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    crop = TwoViewCrop(32)
    for seed in range(20):
        torch.manual_seed(seed)
        box = RandomResizedCrop.get_params(pixels, [0.08, 1.0], [3 / 4, 4 / 3])
        expected = TF.resized_crop(pixels, *box, [32, 32], TF.InterpolationMode.BICUBIC)
        if torch.rand(1).item() < 0.5:
            expected = TF.horizontal_flip(expected)
        torch.manual_seed(seed)
        assert torch.equal(crop.crop(image), expected)


def _jpeg(width: int, height: int) -> Sample:
    """A smooth JPEG (DCT scaling is only close to a full decode where images are smooth)."""
    scene = render_scene(0, 0, max(width, height)).image[:height, :width]
    stream = io.BytesIO()
    Image.fromarray(scene).save(stream, format="JPEG", quality=90)
    return {"__key__": "k", "jpg": stream.getvalue()}


def test_jpeg_views_equal_the_decoded_samples_views() -> None:
    sample, crop = _jpeg(90, 70), TwoViewCrop(32)
    torch.manual_seed(4)
    from_jpeg = crop.from_jpeg(sample)
    torch.manual_seed(4)
    decoded = crop(decode_sample(sample))
    assert all(torch.equal(a, b) for a, b in zip(from_jpeg, decoded, strict=True))


def _view(top: int, left: int, height: int, width: int) -> ViewCrop:
    return ViewCrop(top, left, height, width, flip=False)


def test_draft_factor_keeps_the_smallest_crop_twice_the_output() -> None:
    large, small = _view(0, 0, 900, 1000), _view(0, 0, 300, 200)
    assert draft_factor((large, large), 100, 2.0) == 4
    assert draft_factor((large, small), 100, 2.0) == 1, "the smaller crop decides"
    assert draft_factor((large, _view(0, 0, 400, 450)), 100, 2.0) == 2
    assert draft_factor((_view(0, 0, 5000, 5000),) * 2, 100, 2.0) == 8
    assert draft_factor((large, large), 100, None) == 1


def test_reduced_decoding_keeps_the_crops_and_their_content() -> None:
    sample = _jpeg(1000, 900)
    reduced, full = TwoViewCrop(64), TwoViewCrop(64, reducing_gap=None)
    factors = []
    for seed in range(6):
        torch.manual_seed(seed)
        image = decode_sample(sample).image
        views = (reduced.sample(*image.size), reduced.sample(*image.size))
        factors.append(draft_factor(views, 64, 2.0))
        torch.manual_seed(seed)
        ours = torch.stack(reduced.from_jpeg(sample)).float()
        torch.manual_seed(seed)
        theirs = torch.stack(full.from_jpeg(sample)).float()
        # DCT scaling instead of the filter's own antialiasing: a grey level on average.
        assert (ours - theirs).abs().mean() < 1.5
    assert max(factors) > 1, "some draws decode at a reduced size"


@pytest.mark.parametrize("size", [(80, 60), (50, 1000), (1000, 50), (7, 7)])
def test_crop_box_is_torchvisions(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for seed in range(50):
        torch.manual_seed(seed)
        ours = sample_crop_box(*size, scale, ratio)
        torch.manual_seed(seed)
        assert ours == RandomResizedCrop.get_params(image, list(scale), list(ratio))


def test_crop_boxes_respect_scale_and_ratio() -> None:
    torch.manual_seed(0)
    width, height, scale, ratio = 1000, 800, (0.08, 1.0), (3 / 4, 4 / 3)
    for _ in range(2000):
        top, left, crop_height, crop_width = sample_crop_box(width, height, scale, ratio)
        assert 0 <= top <= height - crop_height and 0 <= left <= width - crop_width
        # Sides are rounded to whole pixels: at least 220 pixels here, so within 1 %.
        area = crop_width * crop_height / (width * height)
        assert scale[0] * 0.99 <= area <= scale[1]
        assert ratio[0] * 0.99 <= crop_width / crop_height <= ratio[1] * 1.01


def test_crop_box_falls_back_to_a_centre_crop() -> None:
    # No crop of at least 8 % of the area and ratio <= 4/3 fits a 1000 x 50 strip.
    assert sample_crop_box(1000, 50, (0.08, 1.0), (3 / 4, 4 / 3)) == (0, 466, 50, 67)
    assert sample_crop_box(50, 1000, (0.08, 1.0), (3 / 4, 4 / 3)) == (466, 0, 67, 50)


OPS: list[tuple[str, Callable, Callable, float, float]] = [
    ("brightness", photometric.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
    ("contrast", photometric.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
    ("saturation", photometric.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    ("hue", photometric.adjust_hue, TF.adjust_hue, -0.5, 0.5),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "low", "high"), OPS, ids=[o[0] for o in OPS])
def test_jitter_op_matches_torchvision(
    name: str, ours: Callable, theirs: Callable, low: float, high: float
) -> None:
    images = _images(8)
    values = torch.linspace(low, high, 8)
    expected = torch.stack(
        [theirs(image, float(v)) for image, v in zip(images, values, strict=True)]
    )
    tolerance = 1e-5 if name == "hue" else 1e-6
    torch.testing.assert_close(ours(images, values), expected, atol=tolerance, rtol=0)


def test_grayscale_blur_and_solarize_match_torchvision() -> None:
    images = _images(6)
    gray = TF.rgb_to_grayscale(images, num_output_channels=1)
    torch.testing.assert_close(photometric.rgb_to_grayscale(images), gray, atol=1e-6, rtol=0)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.0])
    expected = torch.stack(
        [
            TF.gaussian_blur(image, [7, 7], [float(s)] * 2)
            for image, s in zip(images, sigmas, strict=True)
        ]
    )
    blurred = photometric.gaussian_blur(images, sigmas, 7)
    torch.testing.assert_close(blurred, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(photometric.solarize(images, 0.5), TF.solarize(images, 0.5))


def test_color_jitter_follows_each_samples_order() -> None:
    orders = torch.tensor(list(itertools.permutations(range(4))))
    images = _images(len(orders))
    factors = torch.rand(len(orders), 3) * 0.8 + 0.6
    shifts = torch.rand(len(orders)) * 0.2 - 0.1
    expected = []
    for image, order, factor, shift in zip(images, orders, factors, shifts, strict=True):
        for op in order.tolist():
            value = shift if op == photometric.HUE else factor[op]
            image = TV_JITTER[op](image, float(value))
        expected.append(image)
    jittered = photometric.color_jitter(images, factors, shifts, orders)
    torch.testing.assert_close(jittered, torch.stack(expected), atol=1e-5, rtol=0)


def test_apply_photometric_matches_torchvision_step_by_step() -> None:
    torch.manual_seed(3)
    config = PhotometricConfig(
        jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5, solarize_prob=0.5
    )
    images = _images(16, side=40)
    params = sample_params(config, 16, CPU)
    kernel = config.blur_kernel_size(40)
    expected = []
    for index, image in enumerate(images):
        if params.jitter[index]:
            for op in params.order[index].tolist():
                value = params.hue[index] if op == photometric.HUE else params.factors[index, op]
                image = TV_JITTER[op](image, float(value))
        if params.grayscale[index]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur[index]:
            image = TF.gaussian_blur(image, [kernel, kernel], [float(params.sigma[index])] * 2)
        if params.solarize[index]:
            image = TF.solarize(image, config.solarize_threshold)
        expected.append(image)
    augmented = apply_photometric(images, params, config)
    torch.testing.assert_close(augmented, torch.stack(expected), atol=1e-5, rtol=0)


def test_probability_zero_is_the_identity() -> None:
    images = _images(8)
    torch.manual_seed(0)
    assert torch.equal(apply_photometric(images, sample_params(OFF, 8, CPU), OFF), images)


def test_grayscale_with_probability_one_gives_equal_channels() -> None:
    config = dataclasses.replace(OFF, grayscale_prob=1.0)
    out = apply_photometric(_images(4), sample_params(config, 4, CPU), config)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_parameters_differ_across_the_batch() -> None:
    torch.manual_seed(0)
    params = sample_params(BYOL_VIEW_A, 64, CPU)
    for field in dataclasses.fields(PhotometricParams):
        assert getattr(params, field.name).shape[0] == 64
    for values in (params.factors[:, 0], params.factors[:, 1], params.hue, params.sigma):
        assert values.unique().numel() == 64
    assert params.order.unique(dim=0).shape[0] > 10
    same_image = (_images(1) * 255).to(torch.uint8).expand(64, -1, -1, -1)
    out = BatchPhotometric(BYOL_VIEW_A)(same_image)
    assert out.flatten(1).unique(dim=0).shape[0] == 64


def test_parameters_stay_in_their_ranges() -> None:
    torch.manual_seed(0)
    params = sample_params(BYOL_VIEW_B, 2000, CPU)
    low = torch.tensor([0.6, 0.6, 0.8])
    assert bool(((params.factors >= low) & (params.factors <= 2 - low)).all())
    assert params.hue.abs().max() <= 0.1
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0
    # Uniform permutations: each op at each position about a quarter of the time.
    for op in range(4):
        rates = (params.order == op).float().mean(dim=0)
        torch.testing.assert_close(rates, torch.full((4,), 0.25), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("field", "probability"),
    [("jitter_prob", 0.8), ("grayscale_prob", 0.2), ("blur_prob", 0.1), ("solarize_prob", 0.2)],
)
def test_ops_apply_at_the_configured_rate(field: str, probability: float) -> None:
    torch.manual_seed(1)
    config = dataclasses.replace(OFF, **{field: probability})
    images = _images(2000, side=8)
    out = apply_photometric(images, sample_params(config, 2000, CPU), config)
    rate = (out != images).flatten(1).any(dim=1).float().mean().item()
    assert rate == pytest.approx(probability, abs=0.03)


def test_view_presets_are_byols_asymmetric_pair() -> None:
    assert (BYOL_VIEW_A.blur_prob, BYOL_VIEW_A.solarize_prob) == (1.0, 0.0)
    assert (BYOL_VIEW_B.blur_prob, BYOL_VIEW_B.solarize_prob) == (0.1, 0.2)
    assert BYOL_VIEW_A.blur_kernel_size(224) == 23 and BYOL_VIEW_A.blur_kernel_size(64) == 7
    module = TwoViewPhotometric()
    assert module.view_a.config == BYOL_VIEW_A and module.view_b.config == BYOL_VIEW_B


def test_output_is_normalised_float32() -> None:
    grey = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    view_a, view_b = TwoViewPhotometric(OFF, OFF)(grey, grey)
    mean, std = torch.tensor(OFF.mean), torch.tensor(OFF.std)
    expected = ((128 / 255 - mean) / std).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    assert view_a.dtype == view_b.dtype == torch.float32
    torch.testing.assert_close(view_a, expected)
    torch.testing.assert_close(view_b, expected)


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="uint8"):
        BatchPhotometric(BYOL_VIEW_A)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="probabilities"):
        PhotometricConfig(blur_prob=1.5)
    with pytest.raises(ValueError, match="scale"):
        TwoViewCrop(32, scale=(0.5, 0.1))


@pytest.mark.slow
def test_runs_under_torch_compile() -> None:
    module = BatchPhotometric(dataclasses.replace(BYOL_VIEW_B, blur_prob=0.5, solarize_prob=0.5))
    compiled = torch.compile(module, fullgraph=True)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = compiled(images)
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32
    assert bool(out.isfinite().all())
