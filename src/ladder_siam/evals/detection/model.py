"""Mask R-CNN with FPN on a pretrained ResNet, in the SSL-transfer setting.

torchvision's ``maskrcnn_resnet50_fpn`` freezes the stem and BatchNorm (``FrozenBatchNorm2d``)
because its backbone comes with ImageNet-*supervised* statistics. A self-supervised backbone's
BatchNorm statistics are not those, so the SSL transfer protocols (MoCo's and DenseCL's
detectron2 configs, ``NORM: "SyncBN"`` in the backbone, FPN and heads) finetune every stage
with trainable, synchronised BatchNorm instead. This module builds that model:

* the backbone: every stage trainable, its own ``nn.BatchNorm2d`` kept (SyncBN under
  torchrun on GPUs with ``--sync-bn``: two images per GPU are far too few samples for
  BatchNorm on their own, synchronised statistics see the whole batch of 16);
* the FPN (P2-P5 plus a max-pooled P6) with BatchNorm after its convolutions;
* the box head 4conv1fc and the mask head 4conv, both with BatchNorm (DenseCL's detectron2
  Mask R-CNN FPN config; torchvision's ``maskrcnn_resnet50_fpn_v2`` has the same heads);
* the standard RPN head, without normalisation, as in detectron2.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    RPNHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ladder_siam.evals.detection.config import DetectionConfig

# torchvision's feature extractor names: layer1..layer4 = res2..res5.
RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
ASPECT_RATIOS = (0.5, 1.0, 2.0)
HEAD_CONVS = 4


def build_mask_rcnn(backbone: nn.Module, num_classes: int, config: DetectionConfig) -> MaskRCNN:
    """Mask R-CNN with FPN on ``backbone`` (any torchvision ResNet, small-input stem too).

    Args:
        backbone: The pretrained torchvision ResNet (as ``backbone_io.load_backbone`` builds
            it); it is used in place, all its parameters trainable.
        num_classes: Object classes + 1 for the background.
        config: Input size, FPN/head widths, anchors and RPN/ROI sample counts.
    """
    backbone.requires_grad_(True)
    # As torchvision's _resnet_fpn_extractor: after construction ``inplanes`` is the width of
    # res5, and the stages double in width, so res2 has inplanes / 8 channels.
    res2 = backbone.inplanes // 8
    channels = config.fpn_channels
    features = BackboneWithFPN(
        backbone,
        RETURN_LAYERS,
        [res2, 2 * res2, 4 * res2, 8 * res2],
        channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d,
    )
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in config.anchor_sizes),
        aspect_ratios=(ASPECT_RATIOS,) * len(config.anchor_sizes),
    )
    return MaskRCNN(
        features,
        num_classes=None,
        min_size=config.min_size,
        max_size=config.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, len(ASPECT_RATIOS)),
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_test,
        rpn_batch_size_per_image=config.rpn_batch_per_image,
        box_head=FastRCNNConvFCHead(
            (channels, 7, 7), [channels] * HEAD_CONVS, [config.box_fc_dim], nn.BatchNorm2d
        ),
        box_predictor=FastRCNNPredictor(config.box_fc_dim, num_classes),
        box_batch_size_per_image=config.box_batch_per_image,
        box_detections_per_img=config.detections_per_image,
        mask_head=MaskRCNNHeads(channels, [channels] * HEAD_CONVS, 1, nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """SGD groups: weight decay on everything except normalisation parameters.

    detectron2 sets ``WEIGHT_DECAY_NORM = 0``: decaying BatchNorm's scale and shift only
    fights the normalisation.
    """
    norm, other = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)
        (norm if is_norm else other).extend(params)
    return [
        {"params": other, "weight_decay": weight_decay},
        {"params": norm, "weight_decay": 0.0},
    ]
