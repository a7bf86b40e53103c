"""An exported backbone in the files other frameworks read: pure conversions to bytes, no I/O.

``backbone.pt`` is a torchvision ResNet state_dict. The same weights serve elsewhere:

* safetensors: the same tensors and names, in a file that cannot run code when loaded, with
  the architecture in its metadata;
* timm: timm's ResNet names its modules as torchvision does (classifier ``fc`` included), so
  the safetensors file loads strictly into ``timm.create_model(arch, pretrained=True, ...)``;
* Detectron2: a pickle of numpy arrays under Detectron2's names, as its own
  ``tools/convert-torchvision-to-d2.py`` writes them.

The writing (atomic, any URI) is the caller's: pretraining writes ``backbone.safetensors``
with :func:`safetensors_bytes`, and ``ladder-siam export`` writes any of them.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ladder_siam.errors import UsageError
from ladder_siam.nets.backbone_file import BackboneInfo

StateDict = dict[str, torch.Tensor]

# The rules of facebookresearch/detectron2 tools/convert-torchvision-to-d2.py, applied in its
# order after a key without "layer" (the stem) gets the prefix "stem.". They hold for every
# depth: Detectron2 names a BasicBlock's modules conv1, conv2, shortcut like a Bottleneck's.
_D2_RENAMES = (
    *((f"layer{stage}", f"res{stage + 1}") for stage in (1, 2, 3, 4)),
    *((f"bn{index}", f"conv{index}.norm") for index in (1, 2, 3)),
    ("downsample.0", "shortcut"),
    ("downsample.1", "shortcut.norm"),
)
# Detectron2's frozen BatchNorm has no batch counter, so these keys would only be reported as
# unused; torchvision's original ResNet files, the converter's documented input, have none.
_NO_COUNTER = ".num_batches_tracked"
# Every reader of a Detectron2 model zoo file (pickle.load(f, encoding="latin1")) on any
# Python 3 that Detectron2 supports reads protocol 4.
_PICKLE_PROTOCOL = 4


def metadata(info: BackboneInfo) -> dict[str, str]:
    """The safetensors metadata of a backbone: strings only, as the format requires.

    ``format: pt`` is what Hugging Face loaders expect of PyTorch tensors; ``arch`` and
    ``small_input`` say which torchvision model the weights fit.
    """
    return {"format": "pt", "arch": info.arch, "small_input": str(info.small_input).lower()}


def torchvision_bytes(state: StateDict) -> bytes:
    """The state_dict as ``torch.save`` writes it: what ``backbone.pt`` holds."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def safetensors_bytes(state: StateDict, info: BackboneInfo) -> bytes:
    """The same tensors under the same names as a safetensors file, with :func:`metadata`.

    Args:
        state: A torchvision ResNet state_dict, on any device.
        info: Its architecture, recorded in the metadata.
    """
    # safetensors writes from CPU memory and refuses views with gaps in them.
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    return safetensors.torch.save(tensors, metadata=metadata(info))


def timm_bytes(state: StateDict, info: BackboneInfo, uri: str) -> bytes:
    """A safetensors file that ``timm.create_model(arch, pretrained=True)`` loads strictly.

    timm's ResNet has torchvision's module names, classifier ``fc`` included, so the file is
    :func:`safetensors_bytes`; a strict load needs the (zero) ``fc`` too, and timm drops it
    by itself when the model is created with another ``num_classes``.

    Args:
        state: A torchvision ResNet state_dict.
        info: Its architecture.
        uri: The backbone's file, named in the error.

    Raises:
        UsageError: The backbone has the small-input stem, which timm cannot build.
    """
    if info.small_input:
        raise UsageError(
            f"{uri}: a small-input {info.arch} (3x3 stride-1 stem, no max-pool) has no timm "
            "model: timm's ResNet stems all downsample by 4, so its weights cannot load; "
            "export it as torchvision or safetensors and build the stem in code"
        )
    return safetensors_bytes(state, info)


def detectron2_name(key: str) -> str:
    """Detectron2's name for a torchvision ResNet key, as ``convert-torchvision-to-d2.py`` has it.

    For example ``layer3.0.bn1.weight`` -> ``res4.0.conv1.norm.weight``.
    """
    name = key if "layer" in key else f"stem.{key}"
    for old, new in _D2_RENAMES:
        name = name.replace(old, new)
    return name


def detectron2_model(state: StateDict) -> dict[str, np.ndarray]:
    """The backbone's weights as numpy arrays under Detectron2's names.

    The classifier ``fc`` is left out: in our exports it is a zero placeholder that only makes
    torchvision's strict load work, and Detectron2's backbone has no classifier to receive it.
    The BatchNorm batch counters are left out too (see ``_NO_COUNTER``).
    """
    return {
        detectron2_name(key): tensor.detach().cpu().numpy()
        for key, tensor in state.items()
        if not key.startswith("fc.") and not key.endswith(_NO_COUNTER)
    }


class _PortablePickler(pickle.Pickler):
    """Pickles numpy arrays through ``numpy.ndarray(shape, dtype, buffer)``.

    NumPy 2 pickles an array by naming ``numpy._core``, which NumPy before 1.26 cannot import,
    and Detectron2 environments often hold an older NumPy. ``numpy.ndarray`` and ``bytearray``
    (which keeps the array writable, as ``torch.from_numpy`` wants) exist in every version.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            # tobytes() is C-ordered whatever the array's strides, matching the default order
            # of numpy.ndarray(); dtype.str keeps the byte order ("<f4").
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(obj.tobytes()))
        return NotImplemented


def detectron2_bytes(state: StateDict) -> bytes:
    """A Detectron2 model zoo file (``.pkl``) of the backbone.

    ``matching_heuristics`` makes Detectron2 match the names by suffix, so they load into the
    ``backbone.bottom_up`` of an FPN model as into a plain ResNet backbone.
    """
    checkpoint = {
        "model": detectron2_model(state),
        "__author__": "ladder-siam",
        "matching_heuristics": True,
    }
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=_PICKLE_PROTOCOL).dump(checkpoint)
    return buffer.getvalue()
