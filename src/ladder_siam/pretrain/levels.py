"""What a method is: the loss kind and the loss weight of each ResNet stage, res2..res5.

A method names a level string (``ladder-byol`` is ``GGGG``; ``G`` a global BYOL loss, ``D``
DenseBYOL averaged with the global loss, ``-`` none) and the stage weights follow Eq. 6 unless
given. Plain Python, no torch: the pipeline's first step validates a method in a pod that
never trains.
"""

from __future__ import annotations

from ladder_siam.errors import UsageError
from ladder_siam.nets.archs import STAGES

METHODS = {
    "byol": "---G",
    "ladder-byol": "GGGG",
    "dense-byol": "---D",
    "ladder-dense-byol": "DDGG",
}
LEVEL_KINDS = frozenset("GD-")


def parse_levels(method_or_levels: str) -> str:
    """Resolves a method name (``ladder-byol``) or a level string (``DDGG``) to levels.

    Raises:
        ValueError: Neither a known method nor four letters of G, D and -.
    """
    levels = METHODS.get(method_or_levels, method_or_levels)
    if len(levels) != len(STAGES) or not set(levels) <= LEVEL_KINDS or levels[-1] == "-":
        raise UsageError(
            f"method {method_or_levels!r}: expected one of {', '.join(METHODS)} or four "
            "letters of G (global), D (dense) and - (none) for res2..res5, with a loss on res5"
        )
    return levels


def ladder_weights(w: float = 0.5, levels: int = 4) -> list[float]:
    """Loss weights of the stages, lowest first, by the halving heuristic of Eq. 6.

    ``w_i = 2^(i - N) w`` for the intermediate stages ``i = 1 .. N-1`` and 1 for the top:
    every stage one step further from the output gets half the weight. The default gives the
    paper's res2..res5 weights ``1/16, 1/8, 1/4, 1``.

    Args:
        w: The coefficient ``w`` of Eq. 6.
        levels: Number of supervised stages ``N``, the top included.
    """
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    return [2.0 ** (i - levels) * w for i in range(1, levels)] + [1.0]
