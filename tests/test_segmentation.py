"""FCN-D8 segmentation finetune: mIoU arithmetic, dilation, transforms, slide inference, runs."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from system_tools import free_port, require_tool
from torch import nn

from ladder_siam.data.manifest import ManifestError
from ladder_siam.data.shards import DecodedSample
from ladder_siam.evals.segmentation import finetune as segmentation_finetune
from ladder_siam.evals.segmentation.config import (
    SegmentationConfig,
    config_from_args,
    make_config,
)
from ladder_siam.evals.segmentation.data import (
    PAD_COLOR,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
)
from ladder_siam.evals.segmentation.finetune import (
    finetune_segmentation,
    get_args_parser,
    poly_lr,
    segmentation_loss,
)
from ladder_siam.evals.segmentation.miou import ConfusionMatrix
from ladder_siam.evals.segmentation.model import FCN, dilate_resnet, slide_inference
from ladder_siam.nets.backbone_file import load_backbone
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.model import LadderSiam
from ladder_siam.report.statistics import mean_iou
from ladder_siam.runtime.checkpoint import checkpoint_uri
from ladder_siam.runtime.health import NonFiniteLossError
from ladder_siam.runtime.per_image import read_per_image
from ladder_siam.runtime.train_log import read_train_log

CLASSES = ["background", "a", "b", "c", "d"]


def test_scores_match_a_hand_computed_example() -> None:
    # 255 marks ignored pixels; their predictions (3 here) must not count, so class "c" never
    # occurs; class "d" is only predicted (IoU 0, no accuracy).
    truth = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255], [255, 255, 1, 1]])
    guess = torch.tensor([[0, 4, 1, 1], [0, 2, 0, 3], [3, 2, 1, 1]])
    matrix = ConfusionMatrix(5)
    matrix.update(guess, truth)
    # rows truth, columns prediction: background 2 right + 1 as d; a 4 right; b 1 right + 1 as bg
    assert matrix.matrix.tolist() == [
        [2, 0, 0, 0, 1],
        [0, 4, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    scores = matrix.scores(CLASSES)
    # IoU = TP / (TP + FP + FN): bg 2/(2+1+1), a 4/4, b 1/(1+0+1), c undefined, d 0/(0+1+0)
    expected = {"background": 50.0, "a": 100.0, "b": 50.0, "c": None, "d": 0.0}
    assert scores.per_class_iou.keys() == expected.keys()
    for name, value in expected.items():
        assert scores.per_class_iou[name] == (None if value is None else pytest.approx(value))
    assert scores.miou == pytest.approx((50 + 100 + 50 + 0) / 4)
    assert scores.pixel_accuracy == pytest.approx(100 * 7 / 9)
    assert scores.mean_accuracy == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)


def test_accumulating_batches_equals_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 6, (6, 17, 13), generator=generator)
    truth[truth == 5] = 255
    guess = torch.randint(0, 5, (6, 17, 13), generator=generator)
    whole, batched = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(guess, truth)
    for index in range(0, 6, 4):
        batched.update(guess[index : index + 4], truth[index : index + 4])
    assert torch.equal(whole.matrix, batched.matrix)
    reference = np.zeros((5, 5), dtype=np.int64)
    labelled = truth != 255
    np.add.at(reference, (truth[labelled].numpy(), guess[labelled].numpy()), 1)
    assert whole.matrix.tolist() == reference.tolist()
    assert whole.scores(CLASSES) == batched.scores(CLASSES)
    with pytest.raises(ValueError, match=r"ground-truth classes \[7\] outside 0..4"):
        whole.update(torch.zeros(2, dtype=torch.long), torch.tensor([7, 255]))


def _res5(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_dilated_backbone_is_the_pretrained_network_at_stride_8(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)().eval()
    torch.save(original.state_dict(), tmp_path / "backbone.pt")
    loaded, info = load_backbone(str(tmp_path / "backbone.pt"))
    dilated = dilate_resnet(loaded, info.small_input).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense, sparse = _res5(dilated, images), _res5(original, images)
    assert dense.shape[-2:] == (8, 8) and sparse.shape[-2:] == (2, 2)
    # "a trous": the dilated network computes the stride-32 features densely, so every 4th
    # position is exactly the original network's output.
    torch.testing.assert_close(dense[..., ::4, ::4], sparse, rtol=1e-4, atol=1e-4)
    if arch == "resnet50":
        # torchvision's own construction for Bottleneck blocks gives the same network.
        reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
        reference.load_state_dict(original.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(_res5(reference.eval(), images), dense)


def test_small_input_backbone_is_already_at_stride_8(tmp_path: Path) -> None:
    state = LadderSiam(
        "resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True
    ).backbone_state_dict()
    torch.save(state, tmp_path / "backbone.pt")
    loaded, info = load_backbone(str(tmp_path / "backbone.pt"))
    model = FCN(dilate_resnet(loaded, info.small_input), 7, head_channels=8, aux_channels=4)
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    images = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        assert _res5(model.backbone, images).shape[-2:] == (5, 4)
        logits, aux = model(images)
        assert logits.shape == aux.shape == (2, 7, 40, 32)
        assert model.eval()(images)[1] is None
        without_aux = FCN(load_backbone(str(tmp_path / "backbone.pt"))[0], 3, aux_channels=0)
        assert without_aux.aux_head is None and without_aux(images)[1] is None


def _block_sample(seed: int, size: int = 40, block: int = 8) -> tuple[DecodedSample, np.ndarray]:
    """Blocks of random classes, coloured by class; mask values are 10 x class, so that any
    blending of mask values (a non-nearest resize) shows as a value off the multiples of 10.
    """
    palette = np.array(
        [[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250]],
        dtype=np.uint8,
    )
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, len(palette), (size // block, size // block))
    classes = np.kron(cells, np.ones((block, block), dtype=np.int64))
    image = Image.fromarray(palette[classes])
    mask = Image.fromarray((10 * classes).astype(np.uint8), mode="L")
    return DecodedSample(str(seed), image, mask=mask), palette


def test_training_transform_keeps_image_and_mask_aligned() -> None:
    sample, palette = _block_sample(0)
    transform = SegmentationTrainTransform(32, (40, 40), (0.5, 2.0), cat_max_ratio=0.75)
    padded_draws = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, mask = transform(sample)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 10, 20, 30, 40, 50, 255}
        pixels = image.permute(1, 2, 0).numpy().astype(int)
        padding = mask.numpy() == 255  # the source has no 255: these are all padding
        padded_draws += bool(padding.any())
        assert (pixels[padding] == PAD_COLOR).all()
        distances = ((pixels[:, :, None, :] - palette[None, None].astype(int)) ** 2).sum(-1)
        decoded = 10 * distances.argmin(-1)
        agree = (decoded == mask.numpy())[~padding].mean()
        # bilinear resizing blends colours only along block borders
        assert agree > 0.9, f"seed {seed}: image and mask agree on {agree:.0%} of pixels"
    assert padded_draws > 0
    # At ratio 1 with a crop as large as the image, the output is the input or its mirror.
    whole = SegmentationTrainTransform(40, (40, 40), (1.0, 1.0), cat_max_ratio=1.0)
    source = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)
    source_mask = torch.from_numpy(np.array(sample.mask)).long()
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image, mask = whole(sample)
        flipped = torch.equal(image, source.flip(-1))
        assert flipped or torch.equal(image, source)
        assert torch.equal(mask, source_mask.flip(-1) if flipped else source_mask)
        flips.add(flipped)
    assert flips == {True, False}


def test_eval_transform_resizes_the_image_only() -> None:
    sample, _ = _block_sample(1)
    image, mask = SegmentationEvalTransform((80, 20))(sample)
    assert image.shape == (3, 20, 20)
    assert torch.equal(mask, torch.from_numpy(np.array(sample.mask)).long())


def test_slide_inference_equals_whole_image_for_a_pointwise_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    windows: list[tuple[int, int]] = []

    def predict(crops: torch.Tensor) -> torch.Tensor:
        windows.append(tuple(crops.shape[-2:]))
        return model(crops)

    # (height, width) -> windows: mmseg's grid, ceil((side - crop) / stride) + 1 per side
    for (height, width), count in (((50, 37), 5 * 3), ((10, 12), 1), ((16, 16), 1)):
        windows.clear()
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            slid = slide_inference(predict, images, num_classes=5, crop_size=16, stride=11)
            torch.testing.assert_close(slid, model(images))
        assert len(windows) == count
        # windows at the border are shifted back inside, never cut short
        assert set(windows) == {(min(height, 16), min(width, 16))}


def test_poly_schedule_and_presets() -> None:
    lr = poly_lr(0.01, 1e-4, 0.9, 100)
    assert lr[0] == pytest.approx(0.01)
    assert lr[50] == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert bool((lr[1:] < lr[:-1]).all()) and lr[-1] > 1e-4
    args = get_args_parser().parse_args(
        ["--preset", "cityscapes", "--iterations", "5", "--scale", "1024,512", "--backbone", "b"]
    )
    config = config_from_args(argparse.Namespace(**vars(args), log_level="INFO"))
    assert (config.preset, config.crop_size, config.eval_mode, config.batch_size) == (
        "cityscapes", 769, "slide", 8,
    )  # fmt: skip
    assert (config.iterations, config.scale, config.backbone) == (5, [1024, 512], "b")
    assert make_config("voc").crop_size == 512 and make_config("voc").iterations == 20000
    with pytest.raises(ValueError, match="--preset 'ade'"):
        make_config("ade")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("segmentation")
    make_demo_data(str(root / "raw"), images=24, size=32, val_fraction=0.25)
    prepare_shards(str(root / "raw" / "voc"), str(root / "voc"), layout="voc", shard_size=8)
    prepare_shards(str(root / "raw" / "imagefolder"), str(root / "folder"), shard_size=8)
    state = LadderSiam(
        "resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True
    ).backbone_state_dict()
    torch.save(state, root / "backbone.pt")
    return {"root": str(root), "voc": str(root / "voc"), "folder": str(root / "folder")}


def _config(demo: dict[str, str], out: str, **overrides: object) -> SegmentationConfig:
    values = {
        "backbone": str(Path(demo["root"]) / "backbone.pt"), "train": demo["voc"],
        "val": demo["voc"], "out": out, "iterations": 4, "batch_size": 2, "crop_size": 32,
        "scale": [32, 32], "workers": 0, "log_every": 2, "checkpoint_every": 2,
        "keep_checkpoints": 3, "eval_batch_size": 4, **overrides,
    }  # fmt: skip
    return make_config("tiny", **values)


@pytest.mark.slow
def test_finetune_writes_metrics_and_resumes_exactly(
    demo: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = str(tmp_path / "run")
    metrics = finetune_segmentation(_config(demo, out))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == metrics
    assert (written["preset"], written["arch"], written["iterations"]) == ("tiny", "resnet18", 4)
    classes = ["background", "circle", "square", "triangle", "star", "hexagon", "ring"]
    assert list(written["per_class_iou"]) == classes
    assert all(v is None or 0 <= v <= 100 for v in written["per_class_iou"].values())
    for name in ("mIoU", "pixel_accuracy", "mean_accuracy"):
        assert 0 <= written[name] <= 100 and written["scalars"][name] == written[name]
    assert written["pixel_accuracy"] > 0
    # Per image and class, the pixel counts behind the mIoU: summed, they give it exactly.
    evidence = read_per_image(out)
    assert evidence is not None and evidence.images > 1
    counts = evidence.counts["miou"]
    assert counts["intersection"].shape == counts["union"].shape == (evidence.images, len(classes))
    assert mean_iou(counts["intersection"], counts["union"]) == pytest.approx(written["mIoU"])
    # Interrupt after iteration 2: drop the final checkpoint and rerun.
    final = torch.load(checkpoint_uri(out, 4), weights_only=True)["model"]
    Path(checkpoint_uri(out, 4)).unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    with caplog.at_level(logging.INFO):
        finetune_segmentation(_config(demo, out))
    assert "(step 2)" in caplog.text
    resumed = torch.load(checkpoint_uri(out, 4), weights_only=True)["model"]
    assert all(torch.equal(resumed[name], final[name]) for name in final)
    assert [record["step"] for record in read_train_log(out)] == [2, 4]
    assert (tmp_path / "run" / "metrics.json").exists()
    with pytest.raises(ValueError, match=r"cannot resume from step 4.*lr: 0.05 -> 0.1"):
        finetune_segmentation(_config(demo, out, lr=0.1))
    # A re-exported backbone at the same path must not resume the old finetune.
    backbone = tmp_path / "backbone.pt"
    shutil.copy(Path(demo["root"]) / "backbone.pt", backbone)
    other = str(tmp_path / "other")
    finetune_segmentation(_config(demo, other, backbone=str(backbone), iterations=1))
    retrained = LadderSiam("resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True)
    torch.save(retrained.backbone_state_dict(), backbone)
    with pytest.raises(ValueError, match=r"backbone changed since the checkpoint"):
        finetune_segmentation(_config(demo, other, backbone=str(backbone), iterations=1))


@pytest.mark.integration
@pytest.mark.slow
def test_two_rank_evaluation_reproduces_the_single_process_scores(
    demo: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    single = finetune_segmentation(_config(demo, str(out), iterations=2, eval_batch_size=1))
    (out / "metrics.json").unlink()
    # The same settings as flags; the run resumes at its last iteration and only evaluates,
    # each val image on one of the two ranks, the confusion matrices summed.
    flags = {
        "preset": "tiny", "backbone": str(Path(demo["root"]) / "backbone.pt"),
        "train": demo["voc"], "val": demo["voc"], "out": str(out), "iterations": "2",
        "batch-size": "2", "crop-size": "32", "scale": "32,32", "workers": "0",
        "log-every": "2", "checkpoint-every": "2", "keep-checkpoints": "3",
        "eval-batch-size": "1",
    }  # fmt: skip
    torchrun = require_tool(str(Path(sys.executable).parent / "torchrun"))
    command = [torchrun, "--nproc-per-node=2", f"--master-port={free_port()}"]
    command += ["-m", "ladder_siam.evals.segmentation.finetune"]
    command += [item for key, value in flags.items() for item in (f"--{key}", value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stderr
    assert json.loads((out / "metrics.json").read_text()) == single


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_finetune_within_one_interval(
    demo: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def nan_in_step_3(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # two calls a step: the main head's, then the auxiliary one's
        loss = segmentation_loss(logits, masks)
        return loss * math.nan if len(calls) == 5 else loss

    monkeypatch.setattr(segmentation_finetune, "segmentation_loss", nan_in_step_3)
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError,
        match=r"^segmentation finetune: non-finite loss in step 3: loss_main = nan$",
    ):
        finetune_segmentation(_config(demo, str(out)))
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-000002.pt"]
    assert [record["step"] for record in read_train_log(str(out))] == [2]
    assert not (out / "metrics.json").exists()


def test_bad_inputs_fail_before_training(demo: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ManifestError, match="imagefolder layout, but this step needs voc"):
        finetune_segmentation(_config(demo, str(out), train=demo["folder"]))
    with pytest.raises(ValueError, match="is a resnet18, but resnet50 was requested"):
        finetune_segmentation(_config(demo, str(out), arch="resnet50"))
    with pytest.raises(ValueError, match="--slide-stride 0"):
        finetune_segmentation(_config(demo, str(out), slide_stride=0))
    missing = str(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match=r"nothing\.pt: no such file"):
        finetune_segmentation(_config(demo, str(out), backbone=missing))
    assert not out.exists()
