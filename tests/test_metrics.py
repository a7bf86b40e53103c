"""Trainer metrics: named by the conventions, scraped by a real Prometheus, pushed to a real
Pushgateway."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import prometheus_client
import pytest
import torch
from prometheus_servers import (
    prometheus_server,
    pushgateway_server,
    query,
    sample_value,
    scrape,
    wait_for_query,
)
from system_tools import free_port, require_tool

from ladder_siam import __version__
from ladder_siam.runtime.metrics import TrainingMetrics, push_job_metrics
from ladder_siam.runtime.run_folder import run_of

LOSSES = {"res2": 0.5, "res3": 0.75, "res4": 1.25, "res5": 1.5, "total": 4.0}
OUTPUT_STD = {"res2": 0.125, "res3": 0.25, "res4": 0.0625, "res5": 0.03125}
PROBE_TOP1 = {"res2": 31.25, "res3": 37.5, "res4": 43.75, "res5": 62.5}
RANKME = {"res2": 21.5, "res3": 40.25, "res4": 80.0, "res5": 190.5}
PROJECTOR_RANKME = {"res5": 24.75}
# Every series name a training process exposes, as Prometheus stores it (_created aside).
METRIC_NAMES = {
    "ladder_siam_train_steps_total",
    "ladder_siam_train_samples_total",
    "ladder_siam_train_loss",
    "ladder_siam_learning_rate",
    "ladder_siam_ema_tau",
    "ladder_siam_train_step_duration_seconds_bucket",
    "ladder_siam_train_step_duration_seconds_count",
    "ladder_siam_train_step_duration_seconds_sum",
    "ladder_siam_data_wait_seconds_total",
    "ladder_siam_output_std",
    "ladder_siam_collapse_warnings_total",
    "ladder_siam_nonfinite_loss_total",
    "ladder_siam_last_step_timestamp_seconds",
    "ladder_siam_epoch",
    "ladder_siam_images_per_second",
    "ladder_siam_online_probe_top1",
    "ladder_siam_rankme",
    "ladder_siam_build_info",
}
GPU_METRIC_NAMES = {
    "ladder_siam_gpu_memory_allocated_bytes",
    "ladder_siam_gpu_memory_max_allocated_bytes",
}
EXPOSED_NAMES = METRIC_NAMES | (GPU_METRIC_NAMES if torch.cuda.is_available() else set())
FORBIDDEN_LABELS = {"run", "run_id", "run_name", "job_id"}
NON_BASE_UNITS = {"ms", "milliseconds", "minutes", "hours", "kb", "mb", "gb", "megabytes"}


@pytest.fixture(scope="module")
def exporter_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def prometheus(exporter_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("prometheus")
    with prometheus_server([f"127.0.0.1:{exporter_port}"], directory) as url:
        yield url


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pushgateway_server(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


@pytest.fixture
def metrics() -> Iterator[TrainingMetrics]:
    metrics = TrainingMetrics(method="DDGG", arch="resnet18")
    yield metrics
    metrics.close()


def train_a_little(metrics: TrainingMetrics, intervals: int = 1, pause_s: float = 0.0) -> None:
    """Five steps of 8 images, 0.3 s each (0.25 s of it waiting for data), per interval."""
    for epoch in range(intervals):
        for _ in range(5):
            metrics.record_step(batch_size=8, duration_s=0.3, data_wait_s=0.25)
        metrics.record_interval(
            LOSSES, OUTPUT_STD, lr=0.5, tau=0.99, images_per_second=64.0, epoch=epoch
        )
        metrics.record_monitor(PROBE_TOP1, RANKME, PROJECTOR_RANKME)
        time.sleep(pause_s)


def exposed_names(registry: prometheus_client.CollectorRegistry) -> set[str]:
    samples = (sample for family in registry.collect() for sample in family.samples)
    return {sample.name for sample in samples if not sample.name.endswith("_created")}


@pytest.mark.integration
@pytest.mark.slow
def test_prometheus_scrapes_every_metric(
    prometheus: str, exporter_port: int, metrics: TrainingMetrics
) -> None:
    metrics.serve(exporter_port, addr="127.0.0.1")
    # Prometheus applies its targets a few seconds after start: wait for the first scrape, then
    # train across several more, so that rate() sees the counters grow.
    wait_for_query(prometheus, f'up{{instance="127.0.0.1:{exporter_port}"}} == 1')
    train_a_little(metrics, intervals=4, pause_s=1.2)
    metrics.record_nonfinite("res3")
    metrics.record_collapse_warning("res5")

    expected = [
        "ladder_siam_train_steps_total == 20",
        "ladder_siam_train_samples_total == 160",
        "ladder_siam_data_wait_seconds_total == 5",
        "ladder_siam_train_step_duration_seconds_count == 20",
        "ladder_siam_learning_rate == 0.5",
        "ladder_siam_ema_tau == 0.99",
        "ladder_siam_images_per_second == 64",
        "ladder_siam_epoch == 3",
        "ladder_siam_last_step_timestamp_seconds > time() - 60",
        'ladder_siam_nonfinite_loss_total{level="res3"} == 1',
        'ladder_siam_nonfinite_loss_total{level="total"} == 0',
        'ladder_siam_collapse_warnings_total{level="res5"} == 1',
        'ladder_siam_collapse_warnings_total{level="res2"} == 0',
        f'ladder_siam_build_info{{version="{__version__}", method="DDGG", arch="resnet18"}} == 1',
        *(f'ladder_siam_train_loss{{level="{k}"}} == {v}' for k, v in LOSSES.items()),
        *(f'ladder_siam_output_std{{level="{k}"}} == {v}' for k, v in OUTPUT_STD.items()),
        *(f'ladder_siam_online_probe_top1{{level="{k}"}} == {v}' for k, v in PROBE_TOP1.items()),
        *(f'ladder_siam_rankme{{level="{k}", space="backbone"}} == {v}' for k, v in RANKME.items()),
        'ladder_siam_rankme{level="res5", space="projector"} == 24.75',
        'count(ladder_siam_rankme{space="projector"}) == 1',
    ]
    for promql in expected:
        wait_for_query(prometheus, promql)

    quantile = "histogram_quantile(0.9, rate(ladder_siam_train_step_duration_seconds_bucket[30s]))"
    [series] = wait_for_query(prometheus, f"{quantile} > 0")
    # Every step took 0.3 s, in the (0.2, 0.35] bucket; the quantile interpolates inside it.
    assert 0.2 < float(series["value"][1]) <= 0.35

    names = query(prometheus, 'group by (__name__) ({__name__=~"ladder_siam_.*"})')
    stored = {series["metric"]["__name__"] for series in names}
    assert {name for name in stored if not name.endswith("_created")} == EXPOSED_NAMES


def test_exposed_names_are_the_documented_ones(metrics: TrainingMetrics) -> None:
    train_a_little(metrics)
    assert exposed_names(metrics.registry) == EXPOSED_NAMES


def test_names_follow_the_conventions(metrics: TrainingMetrics) -> None:
    train_a_little(metrics)
    for family in metrics.registry.collect():
        assert family.name.startswith("ladder_siam_"), family.name
        assert not NON_BASE_UNITS & set(family.name.split("_")), family.name
        for sample in family.samples:
            assert not FORBIDDEN_LABELS & sample.labels.keys(), sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name


@pytest.mark.integration
def test_promtool_accepts_the_exposition(metrics: TrainingMetrics) -> None:
    promtool = require_tool("/usr/bin/promtool")
    train_a_little(metrics)
    exposition = prometheus_client.generate_latest(metrics.registry)
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
    )
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint


def test_unknown_level_is_refused(metrics: TrainingMetrics) -> None:
    with pytest.raises(ValueError, match="res6"):
        metrics.record_collapse_warning("res6")
    with pytest.raises(ValueError, match="res1"):
        metrics.record_monitor({}, {}, {"res1": 3.0})
    with pytest.raises(ValueError, match="total"):
        metrics.record_interval({}, {"total": 0.1}, lr=0.1, tau=0.99, images_per_second=1, epoch=0)


def test_monitor_series_appear_only_once_measured(metrics: TrainingMetrics) -> None:
    # A 0 before the first measurement would read as a collapse and fire the RankMe alert.
    metrics.record_interval(LOSSES, OUTPUT_STD, lr=0.5, tau=0.99, images_per_second=1, epoch=0)
    names = exposed_names(metrics.registry)
    assert not {"ladder_siam_online_probe_top1", "ladder_siam_rankme"} & names
    metrics.record_monitor(PROBE_TOP1, {}, {})
    value = metrics.registry.get_sample_value
    assert value("ladder_siam_online_probe_top1", {"level": "res4"}) == 43.75
    assert "ladder_siam_rankme" not in exposed_names(metrics.registry)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_gpu_memory_is_absent_without_cuda(metrics: TrainingMetrics) -> None:
    metrics.record_gpu_memory()
    assert not GPU_METRIC_NAMES & exposed_names(metrics.registry)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_is_recorded_with_cuda(metrics: TrainingMetrics) -> None:
    block = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    metrics.record_gpu_memory()
    device = str(torch.cuda.current_device())
    registry = metrics.registry
    allocated = registry.get_sample_value(
        "ladder_siam_gpu_memory_allocated_bytes", {"device": device}
    )
    peak = registry.get_sample_value(
        "ladder_siam_gpu_memory_max_allocated_bytes", {"device": device}
    )
    assert allocated == torch.cuda.memory_allocated() >= block.numel()
    assert peak == torch.cuda.max_memory_allocated() >= allocated


@pytest.mark.integration
def test_push_reaches_the_pushgateway(pushgateway: str, metrics: TrainingMetrics) -> None:
    train_a_little(metrics)
    assert metrics.push("pretrain", "r1", gateway=pushgateway, grouping={"stage": "smoke"})
    samples = scrape(f"{pushgateway}/metrics")
    labels = {"job": "pretrain", "run": "r1", "stage": "smoke"}
    assert sample_value(samples, "ladder_siam_train_steps_total", **labels) == 5
    assert sample_value(samples, "ladder_siam_train_loss", level="res4", **labels) == 1.25


@pytest.mark.integration
def test_push_reads_the_gateway_from_the_environment(
    pushgateway: str, metrics: TrainingMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    metrics.record_step(batch_size=3, duration_s=0.1, data_wait_s=0.0)
    assert metrics.push("from-environment", "r1")
    samples = scrape(f"{pushgateway}/metrics")
    assert sample_value(samples, "ladder_siam_train_samples_total", job="from-environment") == 3


@pytest.mark.integration
def test_push_without_a_gateway_does_nothing(
    pushgateway: str, metrics: TrainingMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PUSHGATEWAY_URL", raising=False)
    assert not metrics.push("nowhere", "r1")
    assert not push_job_metrics("nowhere", {"shards_written": 1}, run="r1")
    samples = scrape(f"{pushgateway}/metrics")
    assert not [sample for sample in samples if sample.labels.get("job") == "nowhere"]


@pytest.mark.integration
def test_push_job_metrics(pushgateway: str) -> None:
    before = time.time()
    values = {"shards_written": 7, "images_written": 45}
    assert push_job_metrics("prepare-shards", values, run="in1k-0a1b2c", gateway=pushgateway)
    # A second job with a metric of the same name: the Pushgateway holds both groups.
    assert push_job_metrics("linear-probe", {"images_written": 10}, run="r1", gateway=pushgateway)
    samples = scrape(f"{pushgateway}/metrics")
    shards = {"job": "prepare-shards", "run": "in1k-0a1b2c"}
    assert sample_value(samples, "ladder_siam_shards_written", **shards) == 7
    assert sample_value(samples, "ladder_siam_images_written", **shards) == 45
    assert sample_value(samples, "ladder_siam_images_written", job="linear-probe") == 10
    success = sample_value(samples, "ladder_siam_job_last_success_timestamp_seconds", **shards)
    assert before <= success <= time.time()


@pytest.mark.integration
def test_the_results_of_two_tenants_runs_never_overwrite_each_other(
    pushgateway: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed = (("team-a", "r50-ladder", 0.71), ("team-b", "r50-ladder", 0.64), ("team-a", "r1", 0.5))
    for namespace, run, top1 in pushed:
        monkeypatch.setenv("POD_NAMESPACE", namespace)  # what the pipeline sets on each step
        assert push_job_metrics("linear-probe", {"probe_top1_ratio": top1}, run=run,
                                gateway=pushgateway)  # fmt: skip
    samples = scrape(f"{pushgateway}/metrics")
    for namespace, run, top1 in pushed:
        value = sample_value(samples, "ladder_siam_probe_top1_ratio", namespace=namespace, run=run)
        assert value == top1, (namespace, run)


def test_a_run_is_named_by_its_folder_wherever_a_step_writes_in_it() -> None:
    assert run_of("s3://bucket/ladder-siam/runs/r50-ladder/eval/linear_probe") == "r50-ladder"
    assert run_of("s3://bucket/ladder-siam/runs/r50-ladder/report") == "r50-ladder"
    # Each arm of a run is grouped on its own, so that two arms never overwrite each other.
    arm = "s3://bucket/ladder-siam/runs/sweep/arms/byol-s1/eval/linear_probe"
    assert run_of(arm) == "sweep/byol-s1"
    assert run_of("s3://bucket/ladder-siam/runs/sweep/arms") == "sweep"
    assert run_of("s3://bucket/ladder-siam/datasets/imagenet-1k-0a1b2c3d4e5f") == (
        "imagenet-1k-0a1b2c3d4e5f"
    )
    assert run_of("/tmp/probe-by-hand/") == "probe-by-hand"


def test_instances_do_not_collide() -> None:
    first = TrainingMetrics(method="DDGG", arch="resnet18")
    second = TrainingMetrics(method="---D", arch="resnet50", levels=("res5",))
    ports = free_port(), free_port()
    try:
        first.serve(ports[0], addr="127.0.0.1")
        second.serve(ports[1], addr="127.0.0.1")
        train_a_little(first, intervals=2)
        second.record_step(batch_size=4, duration_s=1.0, data_wait_s=0.5)
        one, two = (scrape(f"http://127.0.0.1:{port}/metrics") for port in ports)
    finally:
        first.close()
        second.close()
    assert sample_value(one, "ladder_siam_train_steps_total") == 10
    assert sample_value(two, "ladder_siam_train_steps_total") == 1
    assert sample_value(one, "ladder_siam_build_info", method="DDGG") == 1
    assert sample_value(two, "ladder_siam_build_info", method="---D", arch="resnet50") == 1
    assert sample_value(two, "ladder_siam_collapse_warnings_total", level="res2") is None
    # Nothing lands in the process-wide default registry.
    assert not any(
        name.startswith("ladder_siam_") for name in exposed_names(prometheus_client.REGISTRY)
    )
