"""``ladder-siam export``: an exported backbone as a file that another framework loads.

``backbone.pt`` is read and checked as every evaluation reads it (a supported torchvision
ResNet, finite values), converted by :mod:`ladder_siam.nets.formats`, and written atomically
to any URI: the output appears complete or not at all. Everything that can be checked without
reading the backbone (the format, the output's suffix) is checked first.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.nets import formats
from ladder_siam.nets.backbone_file import BackboneInfo, load_backbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputFormat:
    """A format that ``export`` writes.

    Attributes:
        suffixes: The endings the output's name may have. The readers choose their decoder
            by the name (Detectron2 unpickles only ``.pkl``, timm reads safetensors only from
            ``.safetensors``), so another name would be misread.
        help: A few words for ``--help``: what the file is and who reads it.
        encode: The file's bytes from the state_dict, its architecture and the backbone's URI.
    """

    suffixes: tuple[str, ...]
    help: str
    encode: Callable[[formats.StateDict, BackboneInfo, str], bytes]


FORMATS = {
    "torchvision": OutputFormat(
        (".pt", ".pth"),
        "the torchvision state_dict (torch.save), as backbone.pt; for torchvision and mmdet",
        lambda state, info, uri: formats.torchvision_bytes(state),
    ),
    "safetensors": OutputFormat(
        (".safetensors",),
        "the same tensors and names as a .safetensors file (no pickle), arch in its metadata",
        lambda state, info, uri: formats.safetensors_bytes(state, info),
    ),
    "detectron2": OutputFormat(
        (".pkl",),
        "a .pkl of numpy arrays under Detectron2's names (stem, res2..res5), without fc",
        lambda state, info, uri: formats.detectron2_bytes(state),
    ),
    "timm": OutputFormat(
        (".safetensors",),
        "a .safetensors file for timm.create_model(arch, pretrained=True, "
        "pretrained_cfg_overlay=dict(file=...)); not for a small-input stem",
        formats.timm_bytes,
    ),
}


def _output_format(format: str, out: str) -> OutputFormat:
    """The format named ``format``, once ``out`` is known to have one of its suffixes.

    Raises:
        UsageError: An unknown format, or an output name the format's readers would misread.
    """
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    output = FORMATS[format]
    if not out.endswith(output.suffixes):
        raise UsageError(
            f"--out {out}: a {format} file must end in {' or '.join(output.suffixes)}, "
            "the suffix its readers go by"
        )
    return output


def export_backbone(backbone: str, format: str, out: str) -> str:
    """Writes an exported backbone in another framework's format.

    Args:
        backbone: The ``backbone.pt`` to convert (local path, ``file://`` or ``s3://``).
        format: A key of :data:`FORMATS`.
        out: The file to write, with a suffix that fits ``format``.

    Returns:
        ``out``.

    Raises:
        UsageError: An unknown format, an ``out`` suffix that does not fit it, a backbone that
            is not a supported ResNet or holds NaN or infinite values, or a small-input
            backbone for timm. Nothing is written.
        OSError: The backbone cannot be read or the output cannot be written.
    """
    output = _output_format(format, out)
    model, info = load_backbone(backbone)
    data = output.encode(model.state_dict(), info, backbone)
    with storage.atomic_write(out) as stream:
        stream.write(data)
    small = ", small-input stem" if info.small_input else ""
    logger.info("%s (%s%s) written as %s to %s", backbone, info.arch, small, format, out)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam export``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--backbone", required=True, metavar="URI",
        help="the exported backbone.pt: a torchvision ResNet state_dict (local path or s3://)",
    )  # fmt: skip
    # Checked by export_backbone rather than argparse's choices, so that a wrong name is a
    # one-line error like every other bad input.
    parser.add_argument(
        "--format", required=True, metavar="FORMAT",
        help="; ".join(f"{name}: {output.help}" for name, output in FORMATS.items()),
    )  # fmt: skip
    parser.add_argument(
        "--out", required=True, metavar="URI",
        help="the file to write (local path or s3://), ending in "
        + ", ".join(f"{' or '.join(o.suffixes)} for {name}" for name, o in FORMATS.items()),
    )  # fmt: skip
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs ``ladder-siam export`` from parsed arguments."""
    export_backbone(args.backbone, args.format, args.out)
