"""What a ``prepare-shards`` run did with its inputs: found, written, skipped by reason, failed.

The shards of a split and the inputs it left out are gathered once (:class:`SplitOutcome`);
the commit, the refusal of a split that kept nothing, the closing log lines and the pushed
metrics all read them, so the numbers a user sees agree wherever they look.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ladder_siam.data.manifest import AnnotationChange, ShardEntry, SkippedInput
from ladder_siam.errors import UsageError
from ladder_siam.runtime.metrics import push_job_metrics
from ladder_siam.runtime.run_folder import run_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitOutcome:
    """One split's shards, in order, every input it left out, and the annotations it changed."""

    shards: list[ShardEntry]
    skipped: list[SkippedInput]
    changes: list[AnnotationChange] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Samples written into the split's shards."""
        return sum(shard.num_samples for shard in self.shards)


def by_reason(skipped: Iterable[SkippedInput | AnnotationChange]) -> str:
    """``"corrupt 2, missing-image 1"``: skipped inputs (or changes) counted by reason."""
    reasons = Counter(item.reason for item in skipped)
    return ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))


def require_samples(source: str, outcomes: Mapping[str, SplitOutcome]) -> None:
    """Refuses a split whose every input was skipped: its source is broken, not small.

    Raises:
        ValueError: Naming the split, its skip reasons and the first input skipped.
    """
    for split, outcome in sorted(outcomes.items()):
        if outcome.num_samples == 0:
            first = outcome.skipped[0]
            raise UsageError(
                f"{source}: split {split!r}: all {len(outcome.skipped)} inputs were skipped "
                f"({by_reason(outcome.skipped)}); first: {first.source}: {first.detail}"
            )


def log_summary(outcomes: Mapping[str, SplitOutcome], rate: float) -> None:
    """The closing lines: inputs found, written and skipped by reason, then each split."""
    skipped = [item for outcome in outcomes.values() for item in outcome.skipped]
    written = sum(outcome.num_samples for outcome in outcomes.values())
    reasons = by_reason(skipped)
    logger.info(
        "done: %d found, %d written, %d skipped%s; %.1f img/s",
        written + len(skipped), written, len(skipped), f" ({reasons})" if reasons else "", rate,
    )  # fmt: skip
    changes = [change for outcome in outcomes.values() for change in outcome.changes]
    if changes:
        logger.info(
            "annotations changed on kept images: %d (%s); each is listed in its split manifest",
            len(changes), by_reason(changes),
        )  # fmt: skip
    for split, outcome in sorted(outcomes.items()):
        logger.info(
            "  %s: %d samples in %d shards", split, outcome.num_samples, len(outcome.shards)
        )


def log_failure(error: OSError, complete: int, total: int) -> None:
    """The closing line of a run that a failed read stopped."""
    logger.error(
        "failed: %s; %d of %d shards are complete and kept; rerun to write the rest",
        error, complete, total,
    )  # fmt: skip


def push_metrics(
    dest: str,
    layout: str,
    outcomes: Mapping[str, SplitOutcome],
    shards_written: Mapping[str, int],
    duration_s: float,
) -> None:
    """Pushes each split's counts to the Pushgateway when ``$PUSHGATEWAY_URL`` is set.

    One group per dataset, layout and split; the dataset (its shards folder, which names
    the source and its fingerprint) stands for the run, as several runs share it. The
    duration is the whole step's, in every group.
    """
    for split, outcome in sorted(outcomes.items()):
        push_job_metrics(
            "prepare-shards",
            {
                "shards": len(outcome.shards),
                # Fewer than "shards" when a rerun reused finished shards.
                "shards_written": shards_written.get(split, 0),
                "samples": outcome.num_samples,
                "samples_skipped": len(outcome.skipped),
                "annotations_dropped": sum(c.action == "dropped" for c in outcome.changes),
                "annotations_clipped": sum(c.action == "clipped" for c in outcome.changes),
                "prepare_duration_seconds": duration_s,
            },
            run=run_of(dest),
            grouping={"layout": layout, "split": split},
        )
