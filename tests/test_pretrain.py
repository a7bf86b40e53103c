"""Pretraining end to end on CPU: learning, exact resume, failing loudly, distributed runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from prometheus_servers import prometheus_server, wait_for_query
from system_tools import free_port, require_tool

from ladder_siam.cli import main as cli
from ladder_siam.nets.archs import STAGES
from ladder_siam.nets.backbones import torchvision_resnet
from ladder_siam.pretrain import train as pretrain_module
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.runtime.checkpoint import list_checkpoints
from ladder_siam.runtime.health import NonFiniteLossError
from ladder_siam.runtime.train_log import read_train_log

TINY = "tiny_cpu"  # a preset shipped with the package


def tiny(shards: str, out: Path, **overrides: object) -> PretrainConfig:
    settings = {
        "shards": shards, "out": str(out), "method": "ladder-byol", "arch": "resnet18",
        "small_input": True, "image_size": 32, "epochs": 3, "batch_size": 32,
        "warmup_epochs": 0.5, "hidden_dim": 128, "projection_dim": 32, "dense_dim": 16,
        "precision": "fp32", "channels_last": False, "workers": 1, "buffer_size": 50,
        "log_every": 2, "checkpoint_every": 4, "metrics_port": None, "rank_every": 2,
    }  # fmt: skip
    settings.update(overrides)
    return PretrainConfig(**settings)


@pytest.mark.slow
def test_tiny_run_learns_and_exports_a_torchvision_backbone(shards: str, tmp_path: Path) -> None:
    config = tiny(shards, tmp_path, method="ladder-dense-byol", epochs=4)
    uri = pretrain_module.pretrain(config)
    log = read_train_log(str(tmp_path))
    assert [r["step"] for r in log] == list(range(2, 21, 2))
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], "the loss falls"
    assert {"loss_res2", "loss_res5", "std_res2", "lr", "tau", "images_per_second"} <= set(log[0])
    assert log[0]["tau"] < log[-1]["tau"] == pytest.approx(1.0)
    # No stage collapsed, so the falling loss is learning: a constant output has std 0 and
    # well-spread ones about 1/sqrt(projection_dim) (0.13-0.16 here); each level keeps half.
    floor = 0.5 / config.projection_dim**0.5
    assert floor > 10 * config.collapse_threshold
    spread = {stage: log[-1][f"std_{stage}"] for stage in STAGES}  # DDGG supervises all four
    assert all(std > floor for std in spread.values()), spread

    state = torch.load(uri, weights_only=True)
    torchvision_resnet("resnet18", small_input=True).load_state_dict(state)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [12, 16, 20]
    # Beside it, the same tensors without pickle, for frameworks that load only safetensors.
    safe = safetensors.torch.load_file(tmp_path / "backbone.safetensors")
    assert safe.keys() == state.keys() and all(torch.equal(safe[k], state[k]) for k in state)


# Exactness holds at any size: 24 px and narrower heads keep the three runs cheap.
SMALL = {"epochs": 2, "image_size": 24, "hidden_dim": 64}


@pytest.mark.slow
def test_killed_and_resumed_run_ends_bitwise_equal(
    shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrain_module.pretrain(tiny(shards, tmp_path / "straight", **SMALL))

    real_step = pretrain_module.training_step

    def dies_at_step_7(trainer, micro_batches):
        if trainer.step == 7:
            raise KeyboardInterrupt("the pod was evicted")
        return real_step(trainer, micro_batches)

    monkeypatch.setattr(pretrain_module, "training_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        pretrain_module.pretrain(tiny(shards, tmp_path / "resumed", **SMALL))
    assert [step for step, _ in list_checkpoints(str(tmp_path / "resumed"))] == [4]
    monkeypatch.setattr(pretrain_module, "training_step", real_step)
    pretrain_module.pretrain(tiny(shards, tmp_path / "resumed", **SMALL))

    straight = torch.load(tmp_path / "straight/checkpoints/step-000010.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/step-000010.pt", weights_only=True)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # The online monitor resumes exactly too: probe heads, their optimiser, RankMe's ring.
    assert_equal_states(straight["monitor"], resumed["monitor"])
    assert straight["monitor"]["ring"]["filled"] == 10 * 32
    logs = [read_train_log(str(tmp_path / run)) for run in ("straight", "resumed")]
    watched = ["loss", *(f"online_probe_top1_{stage}" for stage in STAGES)]
    assert [[r[k] for k in watched] for r in logs[0]] == [[r[k] for k in watched] for r in logs[1]]


def assert_equal_states(expected: object, actual: object, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), path
        for key, value in expected.items():
            assert_equal_states(value, actual[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), path
        for index, value in enumerate(expected):
            assert_equal_states(value, actual[index], f"{path}/{index}")
    else:
        assert expected == actual, path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_decoding_on_the_device_trains_like_decoding_in_the_loader(
    shards: str, tmp_path: Path
) -> None:
    for decode in ("cpu", "gpu"):
        pretrain_module.pretrain(tiny(shards, tmp_path / decode, decode=decode, max_steps=2))
    cpu, gpu = (read_train_log(str(tmp_path / decode)) for decode in ("cpu", "gpu"))
    assert [r["step"] for r in gpu] == [2]
    # The views differ by a grey level in a few pixels (float vs fixed-point resizing).
    assert [r["loss"] for r in gpu] == pytest.approx([r["loss"] for r in cpu], rel=1e-3)
    # Both paths hand the online monitor the labels.
    assert all(0 <= r["online_probe_top1_res2"] <= 100 for r in (*cpu, *gpu))


@pytest.mark.slow
def test_resume_refuses_changed_settings(shards: str, tmp_path: Path) -> None:
    pretrain_module.pretrain(tiny(shards, tmp_path, max_steps=4))
    with pytest.raises(ValueError, match=r"cannot resume from step 4.*arch: 'resnet18'"):
        pretrain_module.pretrain(tiny(shards, tmp_path, arch="resnet34"))


@pytest.mark.slow
def test_non_finite_loss_stops_within_one_logging_interval(
    shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = pretrain_module.build_model
    calls = []

    def poisoned_at_res3(config, env):
        model = real_build(config, env)

        def nan_once(module, inputs, output):
            calls.append(module)
            # The online res3 projector runs twice a step: call 9 is step 5's first view.
            return output * float("nan") if len(calls) == 9 else output

        model.online.projectors["res3"].register_forward_hook(nan_once)
        return model

    monkeypatch.setattr(pretrain_module, "build_model", poisoned_at_res3)
    with pytest.raises(NonFiniteLossError, match=r"pretraining: .* in step 5: res3 = nan") as error:
        pretrain_module.pretrain(tiny(shards, tmp_path, checkpoint_every=100))
    assert list(error.value.values) == ["res3"]
    # Checked at the end of the interval (log_every 2) or of the epoch, whichever comes first.
    assert 2 * 5 <= len(calls) <= 2 * 6, "ran past the interval of the NaN"
    assert [r["step"] for r in read_train_log(str(tmp_path))] == [2, 4]
    assert list_checkpoints(str(tmp_path)) == [], "nothing saved after the NaN"


def test_bad_settings_fail_before_any_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["pretrain", "--config", TINY, "--shards", str(tmp_path), "--out", str(out)]
    assert cli([*args, "--method", "ladder-simclr"]) == 2
    assert "method 'ladder-simclr'" in caplog.text
    assert cli([*args, "--batch-size", "30", "--accumulation", "4"]) == 2
    assert "--batch-size 30" in caplog.text
    assert cli([*args, "--weights", "1,2"]) == 2
    assert cli([*args, "--decode", "nvjpeg"]) == 2
    assert "--decode 'nvjpeg'" in caplog.text
    assert cli([*args, "--levels", "GGXG"]) == 2
    assert "method 'GGXG'" in caplog.text
    assert cli([*args, "--sync-bn-scope", "rack"]) == 2
    assert "--sync-bn-scope 'rack'" in caplog.text
    assert not out.exists()


def _torchrun(*args: str) -> list[str]:
    torchrun = require_tool(str(Path(sys.executable).parent / "torchrun"))
    return [torchrun, *args, "-m", "ladder_siam.pretrain"]


def _train_args(shards: str, out: Path) -> list[str]:
    return [
        "--config", TINY, "--shards", shards, "--out", str(out), "--max-steps", "4",
        "--hidden-dim", "64", "--projection-dim", "32", "--log-every", "2", "--rank-every", "2",
    ]  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_two_process_gloo_run(shards: str, tmp_path: Path) -> None:
    command = _torchrun("--nproc-per-node=2", f"--master-port={free_port()}")
    result = subprocess.run(
        [*command, *_train_args(shards, tmp_path), "--sync-bn", "true"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stderr
    assert "--sync-bn has no effect on cpu" in result.stderr, "a GPU preset still runs on CPU"
    assert (tmp_path / "backbone.pt").exists()
    log = read_train_log(str(tmp_path))
    assert [r["step"] for r in log] == [2, 4]
    assert all(0 <= r["online_probe_top1_res5"] <= 100 for r in log)
    # RankMe's ring holds both ranks' 16 images of each step, gathered.
    [(_, last)] = list_checkpoints(str(tmp_path))
    assert torch.load(last, weights_only=True)["monitor"]["ring"]["filled"] == 4 * 32


@pytest.mark.integration
@pytest.mark.slow
def test_two_node_run_on_loopback(shards: str, tmp_path: Path) -> None:
    port = free_port()
    nodes = []
    for rank in range(2):
        rendezvous = ["--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1"]
        rendezvous += ["--master-addr=127.0.0.1", f"--master-port={port}"]
        command = [*_torchrun(*rendezvous), *_train_args(shards, tmp_path)]
        nodes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], (
        outputs[0][1][-3000:] + outputs[1][1][-3000:]
    )
    assert "on 2 x cpu" in outputs[0][1]
    assert (tmp_path / "backbone.pt").exists()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("scope", "expected"), [("node", [[0, 1], [2, 3]]), ("all", [[0, 1, 2, 3]])]
)
def test_sync_bn_scope_groups_the_ranks_of_each_node(scope: str, expected: list) -> None:
    """Two nodes of two processes on loopback: a node's ranks share BN statistics, or all do."""
    torchrun = require_tool(str(Path(sys.executable).parent / "torchrun"))
    script = str(Path(__file__).parent / "sync_bn_groups.py")
    port = free_port()
    nodes = []
    for rank in range(2):
        command = [torchrun, "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=2"]
        command += ["--master-addr=127.0.0.1", f"--master-port={port}", script, scope]
        nodes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:]
    reports = sorted(
        (json.loads(line) for out, _ in outputs for line in out.splitlines()),
        key=lambda report: report["rank"],
    )
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    for report in reports:
        assert report["synced"] == report["norms"] > 0, "every BN layer, heads and target too"
        mine = [group for group in expected if report["rank"] in group]
        assert report["groups"] == mine


@pytest.mark.integration
@pytest.mark.slow
def test_real_prometheus_scrapes_a_training_run(shards: str, tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "ladder_siam.pretrain", *_train_args(shards, tmp_path / "run")]
    # 60 steps of 32 images: RankMe's ring fills at step 16 and the run goes on being scraped.
    command += ["--epochs", "12", "--max-steps", "200", "--metrics-port", str(port)]
    with prometheus_server([f"127.0.0.1:{port}"], tmp_path) as url:
        run = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_query(url, "ladder_siam_train_steps_total > 4", timeout=90)
            for promql in (
                'ladder_siam_train_loss{level="res2"} > 0',
                'ladder_siam_output_std{level="res5"} > 0',
                "ladder_siam_learning_rate > 0",
                "ladder_siam_ema_tau >= 0.99",
                "ladder_siam_train_samples_total >= 32 * ladder_siam_train_steps_total - 32 * 4",
                "ladder_siam_train_step_duration_seconds_count > 0",
                'ladder_siam_build_info{method="ladder-byol", arch="resnet18"} == 1',
                'ladder_siam_online_probe_top1{level="res2"} >= 0',
            ):
                assert wait_for_query(url, promql, timeout=30), promql
            for space, levels in (("backbone", 4), ("projector", 4)):
                promql = f'count(ladder_siam_rankme{{space="{space}"}} > 1) == {levels}'
                assert wait_for_query(url, promql, timeout=120), promql
        finally:
            run.terminate()
            run.wait(timeout=30)
