"""``ladder-siam artifacts``: list a run's outputs, or download them to a folder.

A run folder holds ``backbone.pt``, ``backbone.json``, ``train_log.jsonl``,
``checkpoints/step-*.pt``, ``eval/<task>/...`` and ``report/...``. ``pull`` copies them with
their relative paths, in parallel, each file atomically (a temporary name in the destination
folder, renamed when complete). A file already present with the listed size is not fetched
again, so a rerun after an interruption picks up where it stopped. Checkpoints are left out
unless asked for: they are the bulk of a run and only needed to resume training.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.run_folder import CHECKPOINTS

logger = logging.getLogger(__name__)

DEFAULT_THREADS = 8
ACTIONS = ("list", "pull")


@dataclass(frozen=True)
class RunFile:
    """One file of a run.

    Attributes:
        path: Path relative to the run folder, with ``/`` separators.
        uri: Full URI of the file.
        size: Size in bytes.
        etag: Version tag (S3 ETag, or the local modification time).
    """

    path: str
    uri: str
    size: int
    etag: str


def list_run(run_uri: str) -> list[RunFile]:
    """Lists every file under a run folder, in lexicographic order of path.

    Args:
        run_uri: The run's folder (local path, ``file://`` or ``s3://``).

    Returns:
        The files, checkpoints included.

    Raises:
        ValueError: Nothing is stored under ``run_uri``.
        OSError: The folder cannot be listed (missing local folder, S3 error).
    """
    root = run_uri.rstrip("/")
    files = []
    for info in storage.list_files(root):
        path = info.uri[len(root) + 1 :]
        # An S3 key may hold "..": written as a local path it would land outside the folder.
        if path.startswith("/") or ".." in path.split("/"):
            raise UsageError(f"{info.uri}: unsafe relative path {path!r} under {run_uri}")
        files.append(RunFile(path, info.uri, info.size, info.etag))
    if not files:
        raise UsageError(f"no files under {run_uri}, is this a run folder?")
    return files


def _matches(path: str, pattern: str) -> bool:
    """Whether ``path`` is ``pattern``, lies in the folder ``pattern``, or matches its glob."""
    folder = pattern.rstrip("/") + "/"
    return path == pattern or path.startswith(folder) or fnmatch.fnmatchcase(path, pattern)


def _in_checkpoints(path: str) -> bool:
    # A run's own checkpoints/ and each arm's (arms/<arm>/checkpoints/).
    return CHECKPOINTS in path.split("/")[:-1]


def _top_level(files: Sequence[RunFile]) -> str:
    names = {f.path.split("/", 1)[0] + ("/" if "/" in f.path else "") for f in files}
    return ", ".join(sorted(names))


def select(
    files: Sequence[RunFile], run_uri: str, only: Sequence[str] = (), checkpoints: bool = False
) -> list[RunFile]:
    """Picks the files that ``pull`` fetches.

    Args:
        files: The run's files, from :func:`list_run`.
        run_uri: The run's folder, named in errors.
        only: Relative paths, folder prefixes (``eval/``) or globs; empty means every file.
        checkpoints: Whether ``checkpoints/`` folders are included: the run's, each arm's and
            each evaluation's (they resume training; the results do not need them).

    Returns:
        The selected files, in the order of ``files``.

    Raises:
        ValueError: A pattern of ``only`` matches no file that would be fetched.
    """
    wanted = [f for f in files if checkpoints or not _in_checkpoints(f.path)]
    if not only:
        return wanted
    for pattern in only:
        if any(_matches(f.path, pattern) for f in wanted):
            continue
        if any(_matches(f.path, pattern) for f in files):
            raise UsageError(
                f"--only {pattern!r}: matches only checkpoints under {run_uri}; "
                "add --checkpoints to fetch them"
            )
        raise UsageError(
            f"--only {pattern!r}: matches nothing under {run_uri}; "
            f"its top level holds {_top_level(files)}"
        )
    return [f for f in wanted if any(_matches(f.path, pattern) for pattern in only)]


def _is_present(file: RunFile, dest: str) -> bool:
    # Size alone decides: the atomic writes never leave a partial file under the final name,
    # so a same-size file is a finished earlier pull; any other size (an older state of the
    # run, a copy cut short by another tool) is fetched again.
    return storage.exists(dest) and storage.size(dest) == file.size


def pull(
    run_uri: str,
    dest_dir: str,
    only: Sequence[str] = (),
    checkpoints: bool = False,
    threads: int = DEFAULT_THREADS,
) -> list[str]:
    """Downloads a run's files into ``dest_dir``, keeping their relative paths.

    Args:
        run_uri: The run's folder (local path, ``file://`` or ``s3://``).
        dest_dir: Destination folder; usually a local path, though any storage URI works.
        only: Relative paths, folder prefixes (``eval/``) or globs to restrict the download.
        checkpoints: Whether to fetch ``checkpoints/`` too.
        threads: Concurrent downloads.

    Returns:
        The relative paths fetched, sorted; files already present are not among them.

    Raises:
        ValueError: ``threads`` below 1, an empty run folder, or a pattern matching nothing.
        OSError: A download or write failed; files finished before it are kept.
    """
    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    selected = select(list_run(run_uri), run_uri, only, checkpoints)
    targets = {f.path: storage.join(dest_dir, f.path) for f in selected}
    todo = [f for f in selected if not _is_present(f, targets[f.path])]
    logger.info(
        "%s: fetching %d files (%d bytes) into %s; %d already there",
        run_uri, len(todo), sum(f.size for f in todo), dest_dir, len(selected) - len(todo),
    )  # fmt: skip
    fetched: list[str] = []
    pool = ThreadPoolExecutor(threads, thread_name_prefix="artifacts-pull")
    try:
        futures: dict[Future[None], RunFile] = {
            pool.submit(storage.copy_file, f.uri, targets[f.path]): f for f in todo
        }
        with Progress(len(todo), "pull", unit="file", logger=logger) as progress:
            for future in as_completed(futures):
                future.result()
                fetched.append(futures[future].path)
                progress.update()
    except OSError as error:
        logger.error(
            "failed: %s; %d of %d files fetched and kept; rerun to fetch the rest",
            error, len(fetched), len(todo),
        )  # fmt: skip
        raise
    finally:
        # On a failure, queued downloads are dropped; the ones running finish their file.
        pool.shutdown(cancel_futures=True)
    logger.info("done: %d fetched, %d already there", len(fetched), len(selected) - len(todo))
    return sorted(fetched)


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam artifacts list|pull``.

    The action is a positional choice rather than a subparser: options of a nested parser
    would have to precede the action, so ``pull RUN --to DIR --s3-endpoint URL`` would fail.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "action", choices=ACTIONS,
        help="list: print each file of the run (size in bytes, path); pull: download them",
    )  # fmt: skip
    parser.add_argument("run", metavar="RUN_URI", help="the run's output folder")
    parser.add_argument("--to", metavar="DIR", help="pull: destination folder (required)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="PATH",
        help="pull: only this relative path, folder (eval/) or glob ('eval/*/metrics.json'); "
        "repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoints", action="store_true",
        help="pull: also fetch checkpoints/ (large; only needed to resume training)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS,
        help="pull: concurrent downloads (default: %(default)s)",
    )  # fmt: skip
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs ``artifacts list`` or ``artifacts pull`` from parsed arguments.

    Raises:
        ValueError: ``pull`` without ``--to``, or ``list`` with options of ``pull``.
    """
    if args.action == "list":
        if args.to or args.only or args.checkpoints:
            raise UsageError("list: --to, --only and --checkpoints belong to pull")
        for file in list_run(args.run):
            print(f"{file.size:>12}  {file.path}")
        return
    if not args.to:
        raise UsageError(f"pull {args.run}: --to DIR is required")
    pull(args.run, args.to, only=args.only, checkpoints=args.checkpoints, threads=args.threads)
