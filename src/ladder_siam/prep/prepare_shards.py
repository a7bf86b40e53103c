"""``ladder-siam prepare-shards``: a source dataset in object storage -> webdataset shards.

The inputs of each split are shuffled with the seed and cut into shards of ``shard_size``
inputs, so every shard mixes all classes and the same inputs and seed always give the same,
byte-identical shards. Shards are written in parallel by a process pool, each atomically and
followed by a small receipt; the split manifests and then the dataset manifest are written
last and are the commit point. A rerun (after a crash, or on unchanged data) reuses every
shard whose receipt matches and whose bytes are still the ones the receipt describes, and
writes the rest: a shard whose storage version tag (S3 ETag, local mtime) is the one recorded
when it was written is trusted without reading it, any other is hashed again. Once
committed, the files of any split the previous run's dataset manifest listed but this one
does not are deleted, so no split that left the source stays readable.

A big source can be prepared in parts, by several jobs at once: ``--part I/N`` (1-based, ``1/N``
to ``N/N``) writes every N-th shard of the plan, starting with the I-th, and commits nothing.
The plan depends only on the listing, the seed and the shard size, so the parts never overlap
and together cover it. A plain run afterwards reuses the parts' shards through their receipts,
writes any a part left undone, and commits.

Invalid inputs never stop the job: they are left out and listed in the manifest with a reason.
An input that cannot be *read* (denied, or still failing after the retries) is not invalid: its
shard is not written and the step fails naming it, so that a rerun completes the dataset. A
split whose every input was skipped is an error too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import overload

import numpy as np

from ladder_siam.data.manifest import (
    MANIFEST_NAME,
    DatasetManifest,
    ManifestError,
    ShardEntry,
    SkippedInput,
    SplitManifest,
    SplitSummary,
)
from ladder_siam.data.tar_shards import Sample, ShardWriter
from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.prep import accounting
from ladder_siam.prep.accounting import SplitOutcome
from ladder_siam.prep.images import InvalidImageError
from ladder_siam.prep.listing import SourceItem, SourceListing
from ladder_siam.prep.samples import FIELDS, build_sample
from ladder_siam.prep.sources import LAYOUTS, list_source, require_fingerprint
from ladder_siam.runtime.progress import Progress

logger = logging.getLogger(__name__)

RECEIPTS = "_receipts"
# Reading ahead hides object-storage latency (tens of ms per GET) behind decoding.
READ_AHEAD = 16
# Kept shards verified at once on a rerun.
VERIFY_THREADS = 8
# Bumped whenever the sample format or the rules for skipping change, so old receipts are not
# reused (2: labels are checked: mask values against the classes, RLEs by decoding them;
# 3: COCO records validated before listing, boxes clipped, VOC lines kept whole).
SAMPLE_FORMAT_VERSION = 3


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: which inputs, where, and how."""

    split: str
    index: int
    first_key: int
    items: tuple[SourceItem, ...]
    dest: str
    layout: str
    max_side: int | None
    category_index: dict[int, int]
    num_classes: int

    @property
    def name(self) -> str:
        """The shard's file name."""
        return f"shard-{self.index:06d}.tar"

    def fingerprint(self) -> str:
        """Hash of everything that decides the shard's bytes: inputs, versions, options."""
        content = {
            "version": SAMPLE_FORMAT_VERSION,
            "first_key": self.first_key,
            "items": [asdict(item) for item in self.items],
            "layout": self.layout,
            "max_side": self.max_side,
            "category_index": sorted(self.category_index.items()),
            "num_classes": self.num_classes,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardReceipt:
    """What a finished shard holds; stored beside it so a rerun can reuse it.

    ``version`` is the shard's storage version tag right after it was written (see
    :func:`ladder_siam.io.storage.file_info`); empty in receipts from before it was recorded.
    """

    fingerprint: str
    shard: ShardEntry
    skipped: tuple[SkippedInput, ...]
    inputs: int
    version: str = ""


@overload
def prepare_shards(
    source: str,
    dest: str,
    layout: str = ...,
    shard_size: int = ...,
    max_side: int | None = ...,
    workers: int = ...,
    seed: int = ...,
    fingerprint: str | None = ...,
    *,
    part: None = ...,
) -> DatasetManifest: ...


@overload
def prepare_shards(
    source: str,
    dest: str,
    layout: str = ...,
    shard_size: int = ...,
    max_side: int | None = ...,
    workers: int = ...,
    seed: int = ...,
    fingerprint: str | None = ...,
    *,
    part: tuple[int, int],
) -> None: ...


@overload
def prepare_shards(
    source: str,
    dest: str,
    layout: str = ...,
    shard_size: int = ...,
    max_side: int | None = ...,
    workers: int = ...,
    seed: int = ...,
    fingerprint: str | None = ...,
    *,
    part: tuple[int, int] | None,
) -> DatasetManifest | None: ...


def prepare_shards(
    source: str,
    dest: str,
    layout: str = "imagefolder",
    shard_size: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    seed: int = 0,
    fingerprint: str | None = None,
    *,
    part: tuple[int, int] | None = None,
) -> DatasetManifest | None:
    """Writes one webdataset per split of ``source`` under ``dest``, with manifests.

    Args:
        source: Folder URI of the source dataset (local path, ``file://`` or ``s3://``).
        dest: Folder URI for the shards (``dest/<split>/shard-000000.tar``...).
        layout: One of ``imagefolder``, ``coco``, ``voc``, ``flat``.
        shard_size: Inputs per shard (a shard holds fewer when inputs are skipped).
        max_side: Down-scale images whose longer side exceeds this; None keeps sizes.
        workers: Processes that decode and write shards in parallel.
        seed: Shuffle seed; the same inputs and seed give byte-identical shards.
        fingerprint: The source's listing fingerprint that ``dest`` is named after (the
            pipeline's); the source must still match it, before sharding and at the commit.
        part: ``(I, N)``, 1-based: write only part I of N of the shards (every N-th shard of
            the plan, from the I-th) and commit nothing; a plain run commits once every part
            is done. None writes every shard and commits.

    Returns:
        The dataset manifest that was committed, or None for a part (it commits nothing).

    Raises:
        UsageError: A bad option or a source without inputs of this layout.
        ObjectChangedError: A source object changed since it was listed, or since the
            ``fingerprint`` was taken; nothing is committed, and a rerun lists afresh.
    """
    started = time.monotonic()
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be at least 1")
    if max_side is not None and max_side < 16:
        raise UsageError(f"--max-side {max_side}: must be at least 16 pixels")
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if part is not None and not 1 <= part[0] <= part[1]:
        raise UsageError(f"--part {part[0]}/{part[1]}: I/N needs 1 <= I <= N (parts count from 1)")
    for flag, uri in (("--source", source), ("--dest", dest)):
        if (problem := storage.scheme_problem(uri)) is not None:
            raise UsageError(f"{flag} {uri}: {problem}")
    if fingerprint is not None:
        require_fingerprint(source, fingerprint)
    listing = list_source(source, layout)
    category_index = {cat: i for i, cat in enumerate(listing.category_ids or [])}
    tasks: list[ShardTask] = []
    for split in sorted(set(listing.items) | set(listing.skipped)):
        items = listing.items.get(split, [])
        order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(items))
        shuffled = [items[i] for i in order]
        for index, start in enumerate(range(0, len(shuffled), shard_size)):
            chunk = tuple(shuffled[start : start + shard_size])
            split_dest = storage.join_under(dest, split)
            task = ShardTask(
                split, index, start, chunk, split_dest, layout, max_side, category_index,
                len(listing.classes),
            )  # fmt: skip
            tasks.append(task)
    total_inputs = sum(len(task.items) for task in tasks)
    logger.info(
        "%s: %d inputs in %d splits -> %d shards with %d workers",
        source, total_inputs, len(set(listing.items)), len(tasks), workers,
    )  # fmt: skip
    if part is not None:
        index, count = part
        # Every N-th shard rather than a contiguous run: each part gets a near-equal share of
        # every split, so parts of a source with one huge split still finish together.
        mine = tasks[index - 1 :: count]
        logger.info("part %d/%d: %d of the %d shards", index, count, len(mine), len(tasks))
        receipts, pending = _find_finished(mine)
        start = time.monotonic()
        _write(mine, pending, receipts, workers)
        processed = sum(len(task.items) for task in pending)
        logger.info(
            "part %d/%d: wrote %d shards (%d inputs, %.1f img/s), %d were already complete; "
            "no manifest is written: run prepare-shards without --part, once every part is "
            "done, to commit the dataset",
            index, count, len(pending), processed,
            processed / max(time.monotonic() - start, 1e-9), len(mine) - len(pending),
        )  # fmt: skip
        return None

    receipts, pending = _find_finished(tasks)
    start = time.monotonic()
    _write(tasks, pending, receipts, workers)
    outcomes = _outcomes(listing, tasks, receipts)
    accounting.require_samples(source, outcomes)
    processed = sum(len(task.items) for task in pending)
    written_rate = processed / max(time.monotonic() - start, 1e-9)

    if fingerprint is not None:
        require_fingerprint(source, fingerprint)
    manifest = _commit(dest, source, listing, outcomes, seed, max_side, shard_size)
    accounting.log_summary(outcomes, written_rate)
    written = Counter(task.split for task in pending)
    accounting.push_metrics(dest, layout, outcomes, written, time.monotonic() - started)
    return manifest


def _find_finished(
    tasks: list[ShardTask],
) -> tuple[dict[tuple[str, int], ShardReceipt], list[ShardTask]]:
    """Splits ``tasks`` into finished shards (their receipts by split and index) and the rest."""
    receipts: dict[tuple[str, int], ShardReceipt] = {}
    pending = []
    # Each kept shard is hashed; threads overlap the reads' storage latency.
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        for task, receipt in zip(tasks, pool.map(_reusable_receipt, tasks), strict=True):
            if receipt is None:
                pending.append(task)
            else:
                receipts[(task.split, task.index)] = receipt
    if receipts:
        logger.info("resuming: %d of %d shards are already complete", len(receipts), len(tasks))
    return receipts, pending


def _write(
    tasks: list[ShardTask],
    pending: list[ShardTask],
    receipts: dict[tuple[str, int], ShardReceipt],
    workers: int,
) -> None:
    """Writes the ``pending`` ones of ``tasks``, adding their receipts to ``receipts``."""
    total_inputs = sum(len(task.items) for task in tasks)
    with Progress(total_inputs, "prepare-shards", unit="img", logger=logger) as progress:
        progress.update(sum(receipt.inputs for receipt in receipts.values()))
        try:
            for task, receipt in _run(pending, workers):
                receipts[(task.split, task.index)] = receipt
                progress.update(receipt.inputs, shards=len(receipts))
        except OSError as error:
            # A read that failed is not a bad image: the shard is not written, and a rerun
            # (reusing every finished shard) completes the dataset once storage answers.
            accounting.log_failure(error, len(receipts), len(tasks))
            raise


def _run(tasks: list[ShardTask], workers: int) -> Iterator[tuple[ShardTask, ShardReceipt]]:
    """Writes shards, in a process pool when ``workers > 1``; yields them as they finish."""
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield task, write_shard(task)
        return
    # spawn: workers must not inherit the parent's boto3 connections (not fork-safe), and must
    # see the environment as it is now (a forkserver keeps the one it started with).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future[ShardReceipt], ShardTask] = {
            pool.submit(write_shard, task): task for task in tasks
        }
        for future in as_completed(futures):
            yield futures[future], future.result()


def write_shard(task: ShardTask) -> ShardReceipt:
    """Validates and converts one shard's inputs, writes the tar, then its receipt.

    Runs in a worker process. Both files are written atomically, the receipt after the tar,
    so a receipt always describes a complete shard.
    """
    skipped: list[SkippedInput] = []
    shard_uri = storage.join_under(task.dest, task.name)
    with storage.atomic_write(shard_uri) as stream:
        writer = ShardWriter(stream)
        try:
            for item, result in _read_ahead(task, _build):
                if isinstance(result, InvalidImageError):
                    skipped.append(SkippedInput(item.image, result.reason, result.detail))
                else:
                    writer.write(result)
        finally:
            # Also when a read failed: the tar flushes into the temporary file, which
            # atomic_write then discards, instead of into a closed stream later.
            writer.close()
    entry = ShardEntry(task.name, writer.num_samples, writer.bytes, writer.sha256)
    version = storage.file_info(shard_uri).etag
    receipt = ShardReceipt(task.fingerprint(), entry, tuple(skipped), len(task.items), version)
    storage.write_text(_receipt_uri(task), json.dumps(asdict(receipt), indent=1))
    return receipt


def _build(task: ShardTask, offset: int, item: SourceItem) -> Sample | InvalidImageError:
    key = f"{task.first_key + offset:08d}"
    try:
        return build_sample(
            item, key, task.layout, task.max_side, task.category_index, task.num_classes
        )
    except InvalidImageError as error:
        return error


def _read_ahead(
    task: ShardTask, build: Callable[[ShardTask, int, SourceItem], Sample | InvalidImageError]
) -> Iterator[tuple[SourceItem, Sample | InvalidImageError]]:
    """Builds samples in a few threads, in order, at most ``READ_AHEAD`` in flight.

    Threads overlap the storage reads; PIL releases the GIL while decoding, so they also
    overlap some decoding. Order is kept so shards stay reproducible.
    """
    with ThreadPoolExecutor(max_workers=4) as pool:
        in_flight: deque[tuple[SourceItem, Future[Sample | InvalidImageError]]] = deque()
        for offset, item in enumerate(task.items):
            in_flight.append((item, pool.submit(build, task, offset, item)))
            if len(in_flight) >= READ_AHEAD:
                done_item, future = in_flight.popleft()
                yield done_item, future.result()
        for done_item, future in in_flight:
            yield done_item, future.result()


def _receipt_uri(task: ShardTask) -> str:
    return storage.join_under(task.dest, RECEIPTS, f"{task.name}.json")


def _reusable_receipt(task: ShardTask) -> ShardReceipt | None:
    """The receipt of an already finished, matching, intact shard, or None to write it."""
    try:
        data = json.loads(storage.read_text(_receipt_uri(task)))
        receipt = ShardReceipt(
            fingerprint=data["fingerprint"],
            shard=ShardEntry(**data["shard"]),
            skipped=tuple(SkippedInput(**item) for item in data["skipped"]),
            inputs=int(data["inputs"]),
            version=str(data.get("version", "")),
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if receipt.fingerprint != task.fingerprint():
        return None
    shard_uri = storage.join_under(task.dest, task.name)
    try:
        found = storage.file_info(shard_uri)
    except FileNotFoundError:
        return None
    if found.size != receipt.shard.bytes:
        return None
    # Written again since (the tag changed) or damaged in place at the same size: only the
    # bytes tell. An unchanged tag vouches for them, and the commit after a dataset prepared
    # in parts then costs a HEAD per shard rather than reading the dataset once more.
    if receipt.version and found.etag == receipt.version:
        return receipt
    actual = storage.sha256(shard_uri)
    if actual != receipt.shard.sha256:
        logger.warning(
            "%s: sha256 %s but its receipt recorded %s: the shard was altered or damaged; "
            "writing it again", shard_uri, actual, receipt.shard.sha256,
        )  # fmt: skip
        return None
    return receipt


def _outcomes(
    listing: SourceListing, tasks: list[ShardTask], receipts: dict[tuple[str, int], ShardReceipt]
) -> dict[str, SplitOutcome]:
    """Each split's shards and skipped inputs, from the listing and the shards' receipts."""
    outcomes = {}
    for split in sorted({task.split for task in tasks} | set(listing.skipped)):
        split_receipts = [receipts[(t.split, t.index)] for t in tasks if t.split == split]
        skipped = list(listing.skipped.get(split, []))
        skipped += [s for r in split_receipts for s in r.skipped]
        changes = listing.changes.get(split, [])
        outcomes[split] = SplitOutcome([r.shard for r in split_receipts], skipped, changes)
    return outcomes


def _commit(
    dest: str,
    source: str,
    listing: SourceListing,
    outcomes: dict[str, SplitOutcome],
    seed: int,
    max_side: int | None,
    shard_size: int,
) -> DatasetManifest:
    """Writes the split manifests, then the dataset manifest (the commit point).

    Then deletes the splits that the dataset manifest it replaced listed and it does not.
    """
    previous = _previous_splits(dest)
    splits: dict[str, SplitSummary] = {}
    for split, outcome in outcomes.items():
        manifest = SplitManifest(
            split=split,
            layout=listing.layout,
            classes=listing.classes,
            num_samples=outcome.num_samples,
            shards=outcome.shards,
            skipped=outcome.skipped,
            fields=FIELDS[listing.layout],
            seed=seed,
            max_side=max_side,
            category_ids=listing.category_ids,
            annotation_changes=outcome.changes,
            source=source,
            shard_size=shard_size,
        )
        split_dest = storage.join_under(dest, split)
        storage.write_text(storage.join(split_dest, MANIFEST_NAME), manifest.to_json())
        splits[split] = SplitSummary(
            f"{split}/{MANIFEST_NAME}", outcome.num_samples, len(outcome.shards),
            len(outcome.skipped),
        )  # fmt: skip
    dataset = DatasetManifest(
        layout=listing.layout,
        classes=listing.classes,
        splits=splits,
        source=source,
        category_ids=listing.category_ids,
        location=dest,
    )
    storage.write_text(storage.join(dest, MANIFEST_NAME), dataset.to_json())
    for split in sorted(previous - set(splits)):
        storage.delete_folder(storage.join_under(dest, split))
        logger.warning("%s: removed split %r: it is no longer in %s", dest, split, source)
    return dataset


def _previous_splits(dest: str) -> set[str]:
    """The splits of the dataset manifest already at ``dest``: the only ones a rerun deletes.

    Only a split this step recorded is ever deleted; without a readable dataset manifest
    nothing is.
    """
    uri = storage.join(dest, MANIFEST_NAME)
    try:
        previous = DatasetManifest.from_json(storage.read_text(uri), dest)
    except FileNotFoundError:
        return set()
    except ManifestError as error:
        logger.warning("%s; no split of the dataset it describes will be removed", error)
        return set()
    # This step names a split's folder with one plain name; any other entry was not written
    # by it and could name a folder it never made.
    plain = {split for split in previous.splits if "/" not in split}
    return plain - {"", ".", ".."}


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam prepare-shards``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--source", required=True, help="source dataset folder URI")
    parser.add_argument("--dest", required=True, help="output folder URI for the shards")
    parser.add_argument(
        "--layout", default="imagefolder", choices=LAYOUTS,
        help="source layout: imagefolder (class folders), coco, voc or flat (unlabelled)",
    )  # fmt: skip
    parser.add_argument(
        "--shard-size", type=int, default=1000,
        help="inputs per shard; ~1000 ImageNet JPEGs make ~100 MB shards, large enough for "
        "streaming reads and small enough to spread over many loader workers",
    )  # fmt: skip
    parser.add_argument(
        "--max-side", type=int, default=None,
        help="down-scale images whose longer side exceeds this (e.g. 512 for 224-px training "
        "keeps random-resized-crop quality while shrinking decode time and storage)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (same seed, same shards)")
    parser.add_argument(
        "--fingerprint",
        help="fail unless the source still has this listing fingerprint (the pipeline names "
        "the dataset folder after it), checked before sharding and before the commit",
    )
    parser.add_argument(
        "--part", metavar="I/N",
        help="write only part I of N (1/N..N/N) of the shards and commit nothing, so N jobs "
        "can share a big source; a plain run afterwards reuses their shards and commits",
    )  # fmt: skip
    return parser


def parse_part(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: part 2 of 4, counted from 1.

    Raises:
        UsageError: Not two whole numbers I/N with 1 <= I <= N.
    """
    index, slash, count = text.partition("/")
    try:
        part = (int(index), int(count)) if slash else None
    except ValueError:
        part = None
    if part is None or not 1 <= part[0] <= part[1]:
        raise UsageError(f"--part {text}: expected I/N with 1 <= I <= N, e.g. 1/4 up to 4/4")
    return part


def main(args: argparse.Namespace) -> None:
    """Runs ``prepare-shards`` from parsed arguments."""
    prepare_shards(
        source=args.source,
        dest=args.dest,
        layout=args.layout,
        shard_size=args.shard_size,
        max_side=args.max_side,
        workers=args.workers,
        seed=args.seed,
        fingerprint=args.fingerprint,
        part=None if args.part is None else parse_part(args.part),
    )
