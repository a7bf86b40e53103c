"""FCN-D8, the paper's segmentation model: a dilated ResNet and mmsegmentation's FCN head.

The paper finetunes "FCN-D8 ... provided by mmsegmentation" (Sec. 4.1): the backbone keeps
stride 8 by replacing the strides of res4 and res5 with dilation 2 and 4, an ``FCNHead`` on
res5 predicts the classes, and an auxiliary ``FCNHead`` on res4 adds a 0.4-weighted loss
during training. Logits are upsampled bilinearly to the input size.

Dilation rule (both block types): in res4 and res5 the stride-2 convolutions (the first
block's strided 3x3 conv and its 1x1 shortcut) get stride 1, the strided 3x3 conv keeps the
dilation of the grid it reads (1 in res4, 2 in res5), and every 3x3 conv after it gets the
stage's dilation (2 in res4, 4 in res5). This is the "a trous" construction: the dilated
network computes exactly the original network's features, densely, so every pretrained filter
keeps its receptive field. For Bottleneck blocks it is what torchvision builds with
``replace_stride_with_dilation=[False, True, True]`` (and mmseg with ``contract_dilation``);
torchvision refuses dilation in BasicBlock (resnet18/34), so the convolutions are modified in
place for both block types. mmseg's own BasicBlock dilates only ``conv1``; dilating ``conv2``
as well keeps resnet18/34 equivalent to their pretrained stride-32 form.

Small-input backbones (3x3 stride-1 stem, no max-pool) already reach res5 at stride 8, so
they are left undilated: the output stride is 8 either way, which is what "D8" specifies.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

# Dilation of res4 (layer3) and res5 (layer4) that brings a stride-32 ResNet to stride 8.
STAGE_DILATION = {"layer3": 2, "layer4": 4}


def dilate_resnet(model: ResNet, small_input: bool) -> ResNet:
    """Turns a torchvision ResNet into its output-stride-8 form, in place (see module doc).

    Parameter names and shapes are unchanged, so weights load before or after.

    Args:
        model: A torchvision ResNet (BasicBlock or Bottleneck).
        small_input: The backbone has the small stem; it is already at stride 8 and is
            returned unchanged.

    Returns:
        ``model``.
    """
    if small_input:
        return model
    for name, dilation in STAGE_DILATION.items():
        rate = dilation // 2  # the dilation of the grid before this stage's stride is removed
        for block in getattr(model, name):
            for conv in (block.conv1, block.conv2):  # a Bottleneck's conv3 is 1x1
                if conv.kernel_size != (3, 3):
                    continue
                strided = conv.stride != (1, 1)
                conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)
                if strided:
                    rate = dilation
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
            block.stride = 1
    return model


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # mmcv's ConvModule: conv without bias (BN follows), Kaiming fan-out init, BN, ReLU.
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """mmsegmentation's ``FCNHead``: 3x3 conv-BN-ReLU layers, optional concat, 1x1 classifier.

    Args:
        in_channels: Channels of the feature map it reads.
        channels: Width of its convolutions (mmseg: 512 on res5, 256 for the auxiliary head).
        num_classes: Output classes.
        num_convs: Conv-BN-ReLU layers before the classifier.
        concat_input: Concatenate the input with the convs' output and fuse with one more
            3x3 conv-BN-ReLU (mmseg's decode head does; its auxiliary head does not).
        dropout: Dropout2d rate before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 2,
        concat_input: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(_conv_bn_relu(a, b, 3) for a, b in itertools.pairwise(widths)))
        self.conv_cat = _conv_bn_relu(in_channels + channels, channels, 3) if concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        # mmseg's BaseDecodeHead initialises the classifier with N(0, 0.01) and zero bias.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits at the resolution of ``features``."""
        output = self.convs(features)
        if self.conv_cat is not None:
            output = self.conv_cat(torch.cat([features, output], dim=1))
        return self.classifier(self.dropout(output))


class FCN(nn.Module):
    """FCN-D8: a dilated torchvision ResNet with an FCN head on res5 (and res4, auxiliary).

    Args:
        backbone: A torchvision ResNet already made stride 8 by :func:`dilate_resnet`; its
            ``fc`` is dropped (unused parameters would stall DDP's gradient reduction).
        num_classes: Output classes (background included).
        head_channels: Width of the res5 head.
        aux_channels: Width of the auxiliary res4 head; 0 leaves it out.
        dropout: Dropout2d rate of the heads.
        align_corners: ``align_corners`` of the bilinear upsampling of the logits.
    """

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        head_channels: int = 512,
        aux_channels: int = 256,
        dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        backbone.fc = nn.Identity()
        self.backbone = backbone
        res5 = backbone.layer4[-1]
        res5_channels = (res5.conv3 if hasattr(res5, "conv3") else res5.conv2).out_channels
        self.head = FCNHead(res5_channels, head_channels, num_classes, dropout=dropout)
        self.aux_head: FCNHead | None = None
        if aux_channels:
            # mmseg's auxiliary head: one conv layer, no concat, on res4 (half res5's width).
            self.aux_head = FCNHead(
                res5_channels // 2, aux_channels, num_classes, num_convs=1, concat_input=False,
                dropout=dropout,
            )  # fmt: skip

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the logits and, in training with an auxiliary head, its logits.

        Both are ``[N, classes, H, W]`` at the input's size.
        """
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        res4 = net.layer3(net.layer2(net.layer1(x)))
        logits = self.resize(self.head(net.layer4(res4)), images.shape[-2:])
        if self.aux_head is None or not self.training:
            return logits, None
        return logits, self.resize(self.aux_head(res4), images.shape[-2:])

    def resize(self, logits: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Bilinear resize of logits to ``size`` (as the heads upsample; also for scoring)."""
        return F.interpolate(
            logits, size=tuple(size), mode="bilinear", align_corners=self.align_corners
        )


Predictor = Callable[[torch.Tensor], torch.Tensor]


def whole_inference(predict: Predictor, images: torch.Tensor) -> torch.Tensor:
    """Logits of whole images in one pass (mmseg's ``mode='whole'``, used for VOC)."""
    return predict(images)


def slide_inference(
    predict: Predictor,
    images: torch.Tensor,
    num_classes: int,
    crop_size: int,
    stride: int,
) -> torch.Tensor:
    """Logits from overlapping crops, averaged where they overlap (mmseg's ``mode='slide'``).

    Windows start every ``stride`` pixels; the last row and column of windows are shifted
    back to end at the image border, so every pixel is covered and no window is padded. An
    image smaller than the crop is one window. Used for Cityscapes (769 px crops, stride 513).

    Args:
        predict: Maps ``[N, 3, h, w]`` images to ``[N, num_classes, h, w]`` logits.
        images: ``[N, 3, H, W]`` normalised images.
        num_classes: Channels of the logits.
        crop_size: Window side in pixels.
        stride: Step between windows in pixels.

    Returns:
        ``[N, num_classes, H, W]`` logits.
    """
    batch, _, height, width = images.shape
    logits = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    counts = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for top in _window_starts(height, crop_size, stride):
        for left in _window_starts(width, crop_size, stride):
            bottom, right = min(top + crop_size, height), min(left + crop_size, width)
            crop = images[:, :, top:bottom, left:right]
            logits[:, :, top:bottom, left:right] += predict(crop).float()
            counts[:, :, top:bottom, left:right] += 1
    return logits / counts


def _window_starts(length: int, crop_size: int, stride: int) -> list[int]:
    windows = max(length - crop_size + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop_size, length) - crop_size, 0) for index in range(windows)]
