"""A lost worker does not lose the run: torchrun (``--max-restarts``, as the launcher's jobs
run it) restarts the node's workers, which resume from the newest checkpoint and end with the
same parameters as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_launch import launch_config
from test_pretrain import tiny

from ladder_siam.kube.launch import run_local
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.runtime.checkpoint import list_checkpoints


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command may hold spaces and parentheses; the ppid follows its last ')'.
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError):
                continue  # it ended while we looked
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def trainer_workers() -> list[int]:
    """This test's torchrun workers (not torchrun itself)."""
    workers = []
    for pid in descendants(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ladder_siam.pretrain" in command and b"torch.distributed.run" not in command:
            workers.append(pid)
    return workers


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_worker_restarts_and_the_run_ends_as_if_uninterrupted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    make_demo_data(str(tmp_path / "raw"), images=160, size=40)
    prepare_shards(str(tmp_path / "raw" / "imagefolder"), str(tmp_path / "shards"), shard_size=40)

    def launch(out: Path) -> None:
        pretrain = tiny(
            str(tmp_path / "shards"), out, epochs=10, max_steps=12, workers=0, batch_size=16,
            checkpoint_every=4,
        )  # fmt: skip
        run_local(launch_config(nodes=1, gpus_per_node=2, pretrain=pretrain, max_restarts=2))

    launch(tmp_path / "straight")

    failures: list[BaseException] = []

    def interrupted() -> None:
        try:
            launch(tmp_path / "killed")
        except BaseException as error:  # reported by the assertion below
            failures.append(error)

    runner = threading.Thread(target=interrupted)
    runner.start()
    deadline = time.monotonic() + 300
    while not list_checkpoints(str(tmp_path / "killed")) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = trainer_workers()
    assert len(workers) == 2, "two workers run when the first checkpoint is written"
    os.kill(workers[-1], signal.SIGKILL)  # a lost GPU, an OOM kill
    runner.join(timeout=300)
    assert not runner.is_alive() and failures == []
    # The restarted workers resumed: from the checkpoint, and only the killed run did.
    resumed = f"resuming {tmp_path / 'killed'} from its checkpoint at step"
    assert capfd.readouterr().err.count(resumed) == 2  # once per worker

    steps = [step for step, _ in list_checkpoints(str(tmp_path / "killed"))]
    assert steps[-1] == 12
    straight, restarted = (
        torch.load(tmp_path / run / "checkpoints" / "step-000012.pt", weights_only=True)["model"]
        for run in ("straight", "killed")
    )
    for name, tensor in straight.items():
        assert torch.equal(tensor, restarted[name]), name
