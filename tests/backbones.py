"""Backbone files for the resume tests."""

from __future__ import annotations

from pathlib import Path

import torch


def reexport(backbone: Path) -> None:
    """Rewrites ``backbone`` in place with other weights of the same arch, as a new export would."""
    state = torch.load(backbone, weights_only=True)
    name = next(key for key, tensor in state.items() if tensor.is_floating_point())
    state[name] = state[name] + 1.0
    torch.save(state, backbone)
