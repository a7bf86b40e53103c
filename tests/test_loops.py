"""What every training loop shares (``runtime/loop.py``, ``runtime/health.py``), and that each
rule has one home: a second DDP wrap or autocast rule in a loop is a test failure, not drift."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.health import FiniteCheck, NonFiniteLossError
from ladder_siam.runtime.loop import (
    IntervalLog,
    IntervalMeans,
    autocast,
    convert_sync_bn,
    cpu_threads,
    wrap_ddp,
)
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.train_log import TrainLog, read_train_log

SRC = Path(__file__).resolve().parents[1] / "src" / "ladder_siam"
ONE_PROCESS = DistributedEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "rule", ["DistributedDataParallel(", "torch.autocast(", "convert_sync_batchnorm("]
)
def test_each_rule_every_loop_follows_is_written_once(rule: str) -> None:
    sites = [
        f"{path.relative_to(SRC)}:{number}"
        for path in sorted(SRC.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if rule in line and not line.lstrip().startswith("#")
    ]
    assert len(sites) == 1 and sites[0].startswith("runtime/loop.py:"), sites


def test_every_loop_checks_its_losses_and_keeps_a_train_log() -> None:
    loops = {
        "pretrain/train.py": "pretraining",
        "evals/probe/standard.py": "standard linear probe",
        "evals/probe/heads.py": "linear probe heads",
        "evals/detection/finetune.py": "detection finetune",
        "evals/segmentation/finetune.py": "segmentation finetune",
    }
    for path, name in loops.items():
        text = (SRC / path).read_text()
        assert f'LOOP = "{name}"' in text, path
        assert "FiniteCheck(LOOP" in text and ".check()" in text, path
        assert re.search(r"TrainLog\(|train_log", text), path
        assert "torch.isfinite" not in text, f"{path}: a host sync per step"


def test_interval_means_average_each_name_and_refuse_a_changed_set() -> None:
    means = IntervalMeans()
    assert means.pop() == {}
    means.add({"loss": torch.tensor(1.0), "loss_res5": torch.tensor(4.0)})
    means.add({"loss": torch.tensor(3.0), "loss_res5": torch.tensor(2.0)})
    assert len(means) == 2
    assert means.pop() == {"loss": 2.0, "loss_res5": 3.0}
    assert len(means) == 0 and means.pop() == {}
    means.add({"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"\['loss_res5'\] differ from \['loss'\]"):
        means.add({"loss_res5": torch.tensor(1.0)})


def test_the_finite_check_waits_for_its_call_and_names_where_it_started() -> None:
    check = FiniteCheck("demo loop")
    check.submit(1, {"loss": torch.tensor(1.0), "loss_a": torch.tensor(1.0)})
    check.submit(2, {"loss": torch.tensor(math.nan), "loss_a": torch.tensor(math.inf)})
    check.submit(3, {"loss": torch.tensor(math.nan), "loss_a": torch.tensor(math.nan)})
    with pytest.raises(NonFiniteLossError) as error:
        check.check()
    # The first bad step; its part, not the total the part made non-finite.
    assert str(error.value) == "demo loop: non-finite loss in step 2: loss_a = inf"
    assert (error.value.loop, error.value.step, error.value.values) == (
        "demo loop",
        2,
        {"loss_a": math.inf},
    )
    check.check()  # the bad steps were read once; the next interval starts clean
    check.submit(4, {"loss": torch.tensor(-math.inf)})
    with pytest.raises(NonFiniteLossError, match=r"in step 4: loss = -inf$"):
        check.check()


def test_an_interval_log_writes_one_record_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = IntervalLog("demo loop", 4, TrainLog(str(tmp_path), None))
    progress = Progress(4, "demo", "step", logging.getLogger("test"), enabled=False)
    for value in (1.0, 3.0):
        log.add({"loss": torch.tensor(value), "loss_main": torch.tensor(value / 2)}, images=8)
    with caplog.at_level(logging.INFO, logger="ladder_siam"):
        record = log.write(2, 0.1, progress)
    assert {k: record[k] for k in ("step", "lr", "loss", "loss_main")} == {
        "step": 2,
        "lr": 0.1,
        "loss": 2.0,
        "loss_main": 1.0,
    }
    assert record["images_per_second"] > 0
    assert read_train_log(str(tmp_path)) == [json.loads(json.dumps(record))]
    assert "demo loop step 2/4 loss 2.0000 loss_main 1.0000 lr 0.1" in caplog.text


def test_one_process_trains_its_own_model_in_fp32_unless_asked() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert wrap_ddp(model, ONE_PROCESS) is model
    assert convert_sync_bn(model, ONE_PROCESS) is model
    with autocast(torch.device("cpu"), "fp32"):
        assert model(torch.randn(2, 3, 8, 8)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert model[0](torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16


def test_cpu_threads_are_restored_after_the_loop() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
