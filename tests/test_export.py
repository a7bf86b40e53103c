"""``ladder-siam export``: the backbone as each framework loads it, under each one's names."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from ladder_siam.cli import main as cli
from ladder_siam.errors import UsageError
from ladder_siam.export import FORMATS, export_backbone
from ladder_siam.io import storage
from ladder_siam.nets import formats
from ladder_siam.nets.backbone_file import BackboneInfo
from ladder_siam.nets.backbones import torchvision_resnet
from ladder_siam.pretrain.model import LadderSiam

DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _random_resnet(arch: str, small_input: bool, seed: int) -> nn.Module:
    """A ResNet whose BatchNorm statistics are not the identity, so a swapped buffer shows."""
    torch.manual_seed(seed)
    model = torchvision_resnet(arch, small_input)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """backbone.pt files: a standard resnet18, a small resnet34, our own export, a NaN one."""
    root = tmp_path_factory.mktemp("backbones")
    states = {
        "resnet18": _random_resnet("resnet18", False, 0).state_dict(),
        "resnet34-small": _random_resnet("resnet34", True, 2).state_dict(),
        # What pretraining writes: the small stem and a zero fc.
        "pretrained": LadderSiam(
            "resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True
        ).backbone_state_dict(),
    }
    nan = {key: tensor.clone() for key, tensor in states["resnet18"].items()}
    nan["layer2.0.bn1.running_var"][3] = float("nan")
    states["nan"] = nan
    files = {}
    for name, state in states.items():
        files[name] = root / name / "backbone.pt"
        files[name].parent.mkdir()
        torch.save(state, files[name])
    return files


def _source(backbone: Path) -> dict[str, torch.Tensor]:
    return torch.load(backbone, weights_only=True)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# --- torchvision and safetensors ------------------------------------------------------------


@pytest.mark.parametrize("format", ["torchvision", "safetensors"])
@pytest.mark.parametrize(
    ("name", "arch", "small"),
    [("resnet18", "resnet18", False), ("resnet34-small", "resnet34", True),
     ("pretrained", "resnet18", True)],
)  # fmt: skip
def test_torchvision_and_safetensors_hold_the_exact_tensors_and_load_strictly(
    format: str, name: str, arch: str, small: bool, backbones: dict[str, Path], tmp_path: Path
) -> None:
    suffix = FORMATS[format].suffixes[0]
    out = export_backbone(str(backbones[name]), format, str(tmp_path / f"backbone{suffix}"))
    if format == "torchvision":
        state = torch.load(out, weights_only=True)
    else:
        state = safetensors.torch.load_file(out)
        with safetensors.safe_open(out, framework="pt") as file:
            assert file.metadata() == {
                "format": "pt", "arch": arch, "small_input": str(small).lower()
            }  # fmt: skip
    source = _source(backbones[name])
    assert list(state) == list(source) if format == "torchvision" else set(state) == set(source)
    for key, tensor in source.items():
        assert torch.equal(state[key], tensor), key
        assert state[key].dtype == tensor.dtype, key
    torchvision_resnet(arch, small).load_state_dict(state, strict=True)


def test_safetensors_bytes_takes_weights_from_any_device_for_pretraining() -> None:
    """The call pretraining makes to write backbone.safetensors beside backbone.pt."""
    model = LadderSiam("resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True)
    state = model.backbone_state_dict()
    data = formats.safetensors_bytes(state, BackboneInfo("resnet18", small_input=True))
    loaded = safetensors.torch.load(data)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


# --- timm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_timm_loads_the_file_strictly_and_computes_torchvisions_features(
    arch: str, backbones: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights must come from the file alone
    backbone = backbones.get(arch, tmp_path / "backbone.pt")
    if not backbone.exists():
        torch.save(_random_resnet(arch, False, 1).state_dict(), backbone)
    out = export_backbone(str(backbone), "timm", str(tmp_path / "backbone.safetensors"))
    # timm loads pretrained weights with strict=True: a missing or extra key fails here.
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": out})
    reference = torchvision_resnet(arch)
    reference.load_state_dict(_source(backbone))
    reference.eval()
    model.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
        torch.testing.assert_close(model.forward_features(images), expected)


@pytest.mark.parametrize("arch", DEPTHS)
def test_timm_and_torchvision_name_every_depth_alike(arch: str) -> None:
    """Deeper ResNets than the loading test builds, compared by their keys and shapes only."""
    with torch.device("meta"):
        ours = getattr(torchvision.models, arch)().state_dict()
        theirs = timm.create_model(arch).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_timm_refuses_a_small_input_stem_naming_the_file(
    backbones: dict[str, Path], tmp_path: Path
) -> None:
    backbone = str(backbones["resnet34-small"])
    with pytest.raises(UsageError, match="small-input resnet34") as error:
        export_backbone(backbone, "timm", str(tmp_path / "out" / "backbone.safetensors"))
    assert str(error.value).startswith(backbone)
    assert _files(tmp_path / "out") == []


# --- detectron2 -----------------------------------------------------------------------------


def _converter_names(keys: list[str]) -> dict[str, str]:
    """The key loop of facebookresearch/detectron2 tools/convert-torchvision-to-d2.py (commit
    02b5c4e295e9), as written there but for f-strings, without its loading and saving.
    """
    names = {}
    for k in keys:
        old_k = k
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        names[old_k] = k
    return names


def _kept(keys: list[str]) -> list[str]:
    # The zero fc has no place in Detectron2's backbone, nor BatchNorm's counter in its
    # FrozenBatchNorm2d.
    return [key for key in keys if not key.startswith("fc.") and "num_batches_tracked" not in key]


HAND_WRITTEN = {
    "resnet18": ["stem.conv1.weight", "stem.conv1.norm.running_mean", "res2.0.conv1.norm.weight",
                 "res2.1.conv2.norm.bias", "res3.0.shortcut.weight", "res3.0.shortcut.norm.bias",
                 "res5.1.conv2.weight"],
    "resnet34": ["res4.5.conv2.norm.running_var", "res5.0.shortcut.norm.weight"],
    "resnet50": ["stem.conv1.norm.weight", "res2.0.shortcut.weight", "res2.2.conv3.norm.bias",
                 "res5.2.conv3.norm.running_var"],
    "resnet101": ["res4.22.conv3.weight", "res4.0.shortcut.norm.running_mean"],
    "resnet152": ["res3.7.conv1.norm.weight", "res4.35.conv3.norm.running_var"],
}  # fmt: skip


@pytest.mark.parametrize("arch", DEPTHS)
def test_detectron2_names_follow_its_converter_at_every_depth(arch: str) -> None:
    with torch.device("meta"):
        keys = list(getattr(torchvision.models, arch)().state_dict())
    names = {key: formats.detectron2_name(key) for key in _kept(keys)}
    assert names == {key: _converter_names(keys)[key] for key in _kept(keys)}
    assert set(HAND_WRITTEN[arch]) <= set(names.values())
    assert not any(
        "layer" in name or "bn" in name or "downsample" in name for name in names.values()
    )


@pytest.mark.parametrize("name", ["resnet18", "resnet34-small", "pretrained"])
def test_detectron2_reads_the_pickle_as_its_model_zoo_files(
    name: str, backbones: dict[str, Path], tmp_path: Path
) -> None:
    out = export_backbone(str(backbones[name]), "detectron2", str(tmp_path / "backbone.pkl"))
    data = Path(out).read_bytes()
    # How detectron2.checkpoint.DetectionCheckpointer reads a .pkl.
    checkpoint = pickle.load(io.BytesIO(data), encoding="latin1")
    assert checkpoint["matching_heuristics"] is True
    assert checkpoint["__author__"] == "ladder-siam"
    source = _source(backbones[name])
    names = _converter_names(_kept(list(source)))
    assert set(checkpoint["model"]) == set(names.values())
    for key, d2_name in names.items():
        array = checkpoint["model"][d2_name]
        assert array.flags.writeable, d2_name  # torch.from_numpy warns on a read-only array
        assert torch.equal(torch.from_numpy(array), source[key]), key
    # NumPy 2 pickles name numpy._core, which NumPy < 1.26 cannot import.
    assert b"numpy._core" not in data
    assert b"numpy.core" not in data


# --- the command ----------------------------------------------------------------------------


@pytest.mark.parametrize("format", list(FORMATS))
def test_the_command_writes_the_file_and_names_it(
    format: str, backbones: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ladder_siam")
    out = tmp_path / "exports" / f"backbone{FORMATS[format].suffixes[-1]}"
    argv = ["export", "--backbone", str(backbones["resnet18"]), "--format", format,
            "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
    assert _files(tmp_path / "exports") == [out]
    assert any(str(out) in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("backbone", "format", "out", "message"),
    [
        ("resnet18", "onnx", "backbone.onnx", "--format 'onnx': expected one of torchvision"),
        ("resnet18", "detectron2", "backbone.pt", "a detectron2 file must end in .pkl"),
        ("resnet18", "timm", "backbone.pt", "a timm file must end in .safetensors"),
        ("resnet18", "torchvision", "backbone.safetensors", "must end in .pt or .pth"),
        ("nan", "safetensors", "backbone.safetensors", "layer2.0.bn1.running_var holds 1 NaN"),
        ("resnet34-small", "timm", "backbone.safetensors", "has no timm model"),
        ("garbage", "torchvision", "backbone.pt", "not a loadable state_dict"),
        ("not-resnet", "detectron2", "backbone.pkl", "not a supported ResNet state_dict"),
        ("missing", "torchvision", "backbone.pt", "missing.pt"),
    ],
)
def test_a_bad_export_fails_in_one_line_and_writes_nothing(
    backbone: str, format: str, out: str, message: str,
    backbones: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.ones(2)}, tmp_path / "not-resnet.pt")
    path = backbones.get(backbone, tmp_path / f"{backbone}.pt")
    argv = ["export", "--backbone", str(path), "--format", format,
            "--out", str(tmp_path / "exports" / out)]  # fmt: skip
    assert cli(argv) == 2
    (line,) = _errors(caplog)
    assert message in line
    assert "\n" not in line
    assert _files(tmp_path / "exports") == []


@pytest.mark.integration
def test_export_reads_and_writes_s3(backbones: dict[str, Path], s3_bucket: str) -> None:
    backbone = storage.join(s3_bucket, "runs", "r18", "backbone.pt")
    storage.write_bytes(backbone, backbones["resnet18"].read_bytes())
    out = storage.join(s3_bucket, "exports", "r18.pkl")
    assert cli(["export", "--backbone", backbone, "--format", "detectron2", "--out", out]) == 0
    checkpoint = pickle.loads(storage.read_bytes(out), encoding="latin1")
    assert checkpoint["model"]["res5.1.conv2.norm.running_var"].shape == (512,)
    assert sorted(info.uri for info in storage.list_files(s3_bucket)) == [out, backbone]
