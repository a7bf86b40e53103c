"""Sections 4 and 5 of the report: view distances (Fig. 3) and gradient maps (Fig. 4).

Both need the runs' backbones and a few images. Every run is measured on the same crops and
augmentations (one seed), so differences between runs come from the weights alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ladder_siam.nets.archs import STAGES
from ladder_siam.nets.backbones import ResNetStages
from ladder_siam.report import figures as report_figures
from ladder_siam.report.analysis import (
    augment_views,
    gradient_maps,
    ladder_for_analysis,
    load_stages,
    sample_views,
    view_distances,
)
from ladder_siam.report.html import NOT_RUN, Block, Figure, Paragraph, Section, Table
from ladder_siam.report.inputs import RunResults

logger = logging.getLogger(__name__)

VIEW_TITLE = "5. View distances (Fig. 3)"
GRADIENT_TITLE = "6. Gradient maps (Fig. 4)"
# Crop sides when none is given: the paper's 224 px, or 64 px for backbones with the
# small-input stem (trained on 32-64 px images; at 224 px their res2 would be 224 x 224).
DEFAULT_SIZE = 224
SMALL_INPUT_SIZE = 64
HEADS_CAVEAT = (
    "The projector and predictor heads are not part of backbone.pt: the heads of the levels a "
    "run trained come from its newest checkpoint, the others (and all of them for a run "
    "without checkpoints) are random, and their maps only show which res2 positions that "
    "level's loss is sensitive to through the trained backbone. Each map is scaled to its own "
    "maximum. The res2 loss pools z_res2 globally, so its map is spatially uniform (the paper "
    "omits it for that reason)."
)


@dataclass(frozen=True)
class AnalysisSettings:
    """What the two analyses run on.

    Attributes:
        images: A shard dataset or split URI, or None to skip both analyses.
        count: Images for the view distances.
        image_size: Crop side in pixels; None: 64 for small-input backbones, else 224.
        gradient_images: Images (the first ones) shown in the gradient maps.
        seed: Seed of the crops and augmentations.
    """

    images: str | None
    count: int = 64
    image_size: int | None = None
    gradient_images: int = 4
    seed: int = 0


def _not_run(reason: str) -> tuple[list[Section], dict[str, Any]]:
    note = Paragraph(f"{NOT_RUN}: {reason}", note=True)
    sections = [Section(VIEW_TITLE, [note]), Section(GRADIENT_TITLE, [note])]
    return sections, {"view_distance": None, "gradient_maps": None}


def analysis_sections(
    runs: list[RunResults], settings: AnalysisSettings
) -> tuple[list[Section], dict[str, Any]]:
    """Runs both analyses for every run with a backbone.

    Returns:
        The two sections, and their numbers for ``summary.json``: per run and stage the
        mean and median view distance, per run and level the mean gradient magnitude.

    Raises:
        ValueError: A backbone or the image split cannot be read.
    """
    if settings.images is None:
        return _not_run("no --analysis-images given.")
    backbones = {r.name: load_stages(r.backbone_uri) for r in runs if r.backbone_uri}
    run_uris = {r.name: r.uri for r in runs}
    if not backbones:
        return _not_run("no run has a backbone.pt.")
    small = all(stages.small_input for stages in backbones.values())
    size = settings.image_size or (SMALL_INPUT_SIZE if small else DEFAULT_SIZE)
    crops_a, crops_b = sample_views(settings.images, settings.count, size, settings.seed)
    view_a, view_b = augment_views(crops_a, crops_b, settings.seed)
    logger.info("analysing %d runs on %d images of %d px", len(backbones), len(view_a), size)
    distances, maps, trained = {}, {}, {}
    shown = slice(0, settings.gradient_images)
    for name, stages in backbones.items():
        distances[name] = {s: d.numpy() for s, d in view_distances(stages, view_a, view_b).items()}
        model, trained[name] = ladder_for_analysis(stages, run_uris[name])
        run_maps = gradient_maps(model, view_a[shown], view_b[shown])
        maps[name] = {level: m.detach().numpy() for level, m in run_maps.items()}
    missing = [r.name for r in runs if not r.backbone_uri]
    note: list[Block] = []
    if missing:
        note.append(Paragraph(f"{NOT_RUN} (no backbone.pt): {', '.join(missing)}.", note=True))
    images = crops_a[shown].permute(0, 2, 3, 1).numpy()
    sections = [
        _view_section(distances, len(view_a), size, note),
        _gradient_section(backbones, images, maps, trained, note),
    ]
    summary = {
        "view_distance": {
            name: {
                s: {"mean": float(d.mean()), "median": float(np.median(d))} for s, d in per.items()
            }
            for name, per in distances.items()
        },
        "gradient_maps": {
            name: {level: float(m.mean()) for level, m in per.items()} for name, per in maps.items()
        },
    }
    return sections, summary


def _view_section(
    distances: dict[str, dict[str, np.ndarray]], count: int, size: int, note: list[Block]
) -> Section:
    rows = [
        [name] + [f"{np.median(per[s]):.4f}" for s in STAGES] for name, per in distances.items()
    ]
    png = report_figures.violins(distances, STAGES, "1 - cos(view A, view B)")
    return Section(
        VIEW_TITLE,
        [
            Paragraph(
                f"For {count} images ({size} px), two views with BYOL's augmentations; the "
                "distance between their global-average-pooled, L2-normalised features at each "
                "stage (1 - cosine; the paper's Euclidean distance is sqrt(2 (1 - cos))). "
                "Lower means more consistent under augmentation; the paper finds Ladder "
                "training lowers it below res5."
            ),
            *note,
            Figure("view_distances.png", png, "view distance per stage"),
            Table(["run", *STAGES], rows, "Median distance"),
        ],
    )


def _gradient_section(
    backbones: dict[str, ResNetStages],
    images: np.ndarray,
    maps: dict[str, dict[str, np.ndarray]],
    trained: dict[str, list[str]],
    note: list[Block],
) -> Section:
    blocks: list[Block] = [
        Paragraph(
            "|∂L_level/∂z_res2| summed over channels for each level's loss, next to the first "
            "view of each image. The paper finds later levels' gradients concentrate on "
            "objects and earlier levels' spread over foreground and background."
        ),
        Paragraph(HEADS_CAVEAT, note=True),
        Paragraph(
            "Trained heads: "
            + "; ".join(
                f"{name}: {', '.join(levels) or 'none'}" for name, levels in trained.items()
            )
            + ".",
            note=True,
        ),
        *note,
    ]
    for index, (name, run_maps) in enumerate(maps.items()):
        title = f"{name} ({backbones[name].arch})"
        png = report_figures.gradient_grid(images, run_maps, title)
        blocks.append(Figure(f"gradient_maps_{index}.png", png, f"gradient maps of {name}"))
    # Every run gets the same GGGG model, so every level is there for every run.
    rows = [[name] + [f"{per[s].mean():.3g}" for s in STAGES] for name, per in maps.items()]
    blocks.append(Table(["run", *STAGES], rows, "Mean gradient magnitude per level"))
    return Section(GRADIENT_TITLE, blocks)
