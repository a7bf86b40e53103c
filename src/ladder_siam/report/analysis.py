"""The paper's analyses of intermediate representations: view distances and gradient maps.

* Fig. 3: for two random BYOL views of each image, the distance between their pooled
  features at every stage. A stage that is consistent under augmentation maps both views
  close together; the paper finds Ladder training makes res2-res4 more consistent. We use
  ``1 - cos`` of the L2-normalised GAP features; the paper's Euclidean distance between
  normalised vectors is ``sqrt(2 (1 - cos))``, a monotone function of it.
* Fig. 4: ``|dL_level / dz_res2|`` summed over channels, which shows where in the image each
  level's loss would push the earliest stage.

Everything runs on CPU in eval mode (BatchNorm with the backbone's running statistics), so a
sample's result does not depend on the others in its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ladder_siam.data.crops import TwoViewCrop
from ladder_siam.data.manifest import load_split
from ladder_siam.data.splits import SplitReader
from ladder_siam.errors import UsageError
from ladder_siam.nets.archs import STAGES
from ladder_siam.nets.backbone_file import load_backbone
from ladder_siam.nets.backbones import ResNetStages
from ladder_siam.pretrain.augmentation import TwoViewPhotometric
from ladder_siam.pretrain.model import LadderSiam, upgrade_state_dict
from ladder_siam.runtime import checkpoint

# Width of the heads built for the gradient maps when a run has no checkpoint with trained
# heads: any width gives the same kind of map from random heads; BYOL's 4096 only costs time.
HEAD_HIDDEN_DIM = 1024
HEAD_PROJECTION_DIM = 256


def sample_views(uri: str, count: int, size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two BYOL crops (random resized crop + flip) of the first ``count`` images of a split.

    The same ``seed`` gives the same crops, so every run is measured on identical pairs.

    Args:
        uri: A shard dataset (its ``val`` split is used) or split URI.
        count: Images to take, in manifest order (shards are shuffled when prepared).
        size: Side of the crops in pixels.
        seed: Seeds torch's RNG for the crops, without disturbing the caller's RNG.

    Returns:
        Two uint8 ``[N, 3, size, size]`` batches, ``N = min(count, images in the split)``.

    Raises:
        ManifestError: ``uri`` is not a shard dataset or split.
        ValueError: The split is empty.
    """
    manifest = load_split(uri, "val")
    reader = SplitReader(manifest, count, TwoViewCrop(size), rank=0, world_size=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = next(iter(reader), None)
    if batch is None:
        raise UsageError(f"{uri}: the split has no images to analyse")
    crops_a, crops_b = batch
    return crops_a, crops_b


def augment_views(crops_a: Tensor, crops_b: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """BYOL's asymmetric photometric augmentation of two uint8 crop batches, normalised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TwoViewPhotometric()(crops_a, crops_b)


def load_stages(backbone_uri: str) -> ResNetStages:
    """An exported ``backbone.pt`` as a :class:`ResNetStages`, in eval mode.

    Raises:
        ValueError: The file is not a supported ResNet state_dict.
    """
    net, info = load_backbone(backbone_uri)
    stages = ResNetStages(info.arch, info.small_input)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    stages.load_state_dict(state)
    return stages.eval()


def ladder_for_analysis(
    stages: ResNetStages, run_uri: str | None = None
) -> tuple[LadderSiam, list[str]]:
    """A Ladder-BYOL model (``GGGG``) around a trained backbone, for gradient maps.

    The backbone's weights go into both the online and the target backbone. The heads of
    every level the run trained come from its newest checkpoint (``backbone.pt`` does not
    carry them); the others are random.

    Returns:
        The model in eval mode, and the levels whose heads are the trained ones.
    """
    latest = checkpoint.load_latest(run_uri) if run_uri else None
    saved = latest.state["config"] if latest else {}
    model = LadderSiam(
        stages.arch,
        "GGGG",
        small_input=stages.small_input,
        hidden_dim=saved.get("hidden_dim", HEAD_HIDDEN_DIM),
        projection_dim=saved.get("projection_dim", HEAD_PROJECTION_DIM),
    )
    model.online.backbone.load_state_dict(stages.state_dict())
    trained: list[str] = []
    if latest is not None:
        heads = {
            key: value
            for key, value in upgrade_state_dict(latest.state["model"]).items()
            if key.startswith(("online.projectors.", "predictors."))
        }
        model.load_state_dict(heads, strict=False)
        trained = sorted({key.removeprefix("online.").split(".")[1] for key in heads})
    # tau = 0 makes the EMA target an exact copy of the online network.
    model.update_target(0.0)
    return model.eval(), trained


@torch.no_grad()
def view_distances(
    backbone: ResNetStages, view_a: Tensor, view_b: Tensor, batch_size: int = 32
) -> dict[str, Tensor]:
    """Per stage, ``1 - cos`` between the two views' L2-normalised GAP features.

    Args:
        backbone: The network, in eval mode.
        view_a: float ``[N, 3, H, W]``, first views.
        view_b: float ``[N, 3, H, W]``, second views of the same images.
        batch_size: Images per forward pass, to bound memory at 224 px.

    Returns:
        Stage -> float ``[N]`` distances in [0, 2].
    """
    parts: dict[str, list[Tensor]] = {stage: [] for stage in STAGES}
    for start in range(0, view_a.shape[0], batch_size):
        features_a = backbone(view_a[start : start + batch_size])
        features_b = backbone(view_b[start : start + batch_size])
        for stage in STAGES:
            pooled_a = F.normalize(features_a[stage].mean(dim=(2, 3)), dim=1)
            pooled_b = F.normalize(features_b[stage].mean(dim=(2, 3)), dim=1)
            parts[stage].append(1 - (pooled_a * pooled_b).sum(dim=1))
    return {stage: torch.cat(chunks) for stage, chunks in parts.items()}


def gradient_maps(model: LadderSiam, view_a: Tensor, view_b: Tensor) -> dict[str, Tensor]:
    """Per supervised level, ``|dL_level / dz_res2|`` of the first views, summed over channels.

    ``z_res2`` is the online backbone's res2 output for ``view_a``, captured by a forward
    hook (the first call of the online backbone in ``LadderSiam.forward``). A level's loss
    reaches it through the stages above res2, so each map shows where that level's loss is
    sensitive. The res2 loss itself pools z_res2 globally, which gives a spatially uniform
    map (the reason the paper leaves it out of Fig. 4).

    Args:
        model: The Ladder model; put it in eval mode for per-image results.
        view_a: float ``[N, 3, H, W]``, the views the maps are computed for.
        view_b: float ``[N, 3, H, W]``, their partner views.

    Returns:
        Level -> float ``[N, h, w]`` non-negative maps at res2's resolution.
    """
    captured: list[Tensor] = []
    hook = model.online.backbone.layer1.register_forward_hook(
        lambda _module, _inputs, output: captured.append(output)
    )
    try:
        with torch.enable_grad():
            output = model(view_a, view_b)
            z_res2 = captured[0]
            maps = {}
            for level, loss in output.per_level.items():
                (gradient,) = torch.autograd.grad(loss, z_res2, retain_graph=True)
                maps[level] = gradient.abs().sum(dim=1)
    finally:
        hook.remove()
    return maps
