"""Metrics of a multi-node run add up: each pod counts its own share of the images, so a
dashboard's ``sum`` over pods is the run's, as a real Prometheus scraping two nodes sees it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from prometheus_servers import prometheus_server, wait_for_query
from system_tools import free_port
from test_pretrain import _torchrun, _train_args

BATCH = 32  # the tiny_cpu preset's global batch


@pytest.mark.integration
@pytest.mark.slow
def test_images_counted_by_the_pods_sum_to_the_images_trained(shards: str, tmp_path: Path) -> None:
    rendezvous_port, metrics_ports = free_port(), (free_port(), free_port())
    with prometheus_server([f"127.0.0.1:{port}" for port in metrics_ports], tmp_path) as url:
        nodes = []
        for rank, metrics_port in enumerate(metrics_ports):
            rendezvous = ["--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1"]
            rendezvous += ["--master-addr=127.0.0.1", f"--master-port={rendezvous_port}"]
            command = [*_torchrun(*rendezvous), *_train_args(shards, tmp_path / "run")]
            command += ["--max-steps", "400", "--metrics-port", str(metrics_port)]
            nodes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        try:
            wait_for_query(url, "min(ladder_siam_train_steps_total) > 3", timeout=120)
            # Both pods report, and their images add up to the global batches of the steps
            # (within one step: the two pods are scraped a moment apart).
            assert wait_for_query(url, "count(ladder_siam_train_samples_total) == 2")
            sum_of_pods = (
                f"abs(sum(ladder_siam_train_samples_total)"
                f" - {BATCH} * avg(ladder_siam_train_steps_total)) <= {BATCH}"
            )
            assert wait_for_query(url, sum_of_pods, timeout=30)
        finally:
            for node in nodes:
                node.terminate()
            for node in nodes:
                node.wait(timeout=60)
