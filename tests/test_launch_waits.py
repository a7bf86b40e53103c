"""The launcher on a busy, shared cluster: it says why a job waits and gives up in time, and a
retried launcher adopts only the job its own KFP run created (through kfp.local, the real KFP
executor, against the fake API server)."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import yaml
from fake_kubernetes import UNSCHEDULABLE, Script, fake_kubernetes
from kfp import dsl, local
from test_launch import launch_config

from ladder_siam.components.pretrain import pretrain
from ladder_siam.kube.launch import JobConflictError, Launcher, run
from ladder_siam.kube.launch_config import OWNER_LABEL
from ladder_siam.kube.pytorchjob import build_pytorchjob
from ladder_siam.kube.waiting import JobPendingError
from ladder_siam.runtime.run_folder import RunFolder


def waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " waiting " in r.getMessage()]


def test_a_job_without_gpus_says_why_and_is_deleted_after_the_pending_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ladder_siam.kube.launch")
    with fake_kubernetes(Script(outcome=None, pending_polls=None)) as (cluster, api):
        launcher = Launcher("ml-research", api)
        name = launcher.submit(build_pytorchjob(launch_config()))
        with pytest.raises(JobPendingError) as failure:
            launcher.wait(
                name, timeout_s=30, poll_s=0.02, pods=4, pending_timeout_s=0.3,
                report_every_s=0.1,
            )  # fmt: skip
    # The step fails with the scheduler's own words, and no GPU job is left waiting.
    message = str(failure.value)
    assert "0/4 pods running" in message and UNSCHEDULABLE in message
    pods = ", ".join(f"{name}-{pod}" for pod in ("master-0", "worker-0", "worker-1", "worker-2"))
    assert f"Unschedulable: {UNSCHEDULABLE} ({pods})" in message
    assert message.count(UNSCHEDULABLE) == 1  # the pods' conditions and Events, said once
    assert cluster.deleted == [name] and cluster.jobs == {}
    # Meanwhile the reason was logged at the report interval, not at every poll.
    lines = waiting_lines(caplog)
    assert 2 <= len(lines) < cluster.polls and all(UNSCHEDULABLE in line for line in lines)


def test_a_job_whose_pods_start_after_a_wait_runs_to_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ladder_siam.kube.launch")
    with fake_kubernetes(Script("Succeeded", after_polls=6, pending_polls=3)) as (cluster, api):
        config = launch_config(pending_timeout_minutes=10)
        run(config, Launcher("ml-research", api), poll_s=0.01)
    assert cluster.deleted == [] and cluster.created == 1
    assert len(waiting_lines(caplog)) == 1  # the first poll saw the wait; then it ran


def test_a_retried_launcher_adopts_only_its_own_runs_job() -> None:
    ours = build_pytorchjob(launch_config(owner="kfp-run-a"))
    with fake_kubernetes(Script(outcome=None)) as (cluster, api):
        launcher = Launcher("ml-research", api)
        launcher.submit(ours)
        assert launcher.submit(ours) == ours["metadata"]["name"]  # the retry adopts it
        other = build_pytorchjob(launch_config(owner="kfp-run-b"))
        with pytest.raises(JobConflictError) as conflict:
            launcher.submit(other)
    message = str(conflict.value)
    assert "kfp-run-a" in message and "kfp-run-b" in message
    assert "kubectl delete pytorchjobs -n ml-research ladder-byol-r50-200ep" in message
    # Never followed, never replaced: the other run's job is untouched.
    assert cluster.created == 1 and cluster.deleted == []
    assert cluster.jobs[ours["metadata"]["name"]]["metadata"]["labels"][OWNER_LABEL] == "kfp-run-a"

    # A job of the name that someone applied by hand is not adopted either.
    with fake_kubernetes(Script(outcome=None)) as (cluster, api):
        cluster.jobs[ours["metadata"]["name"]] = build_pytorchjob(launch_config())
        with pytest.raises(JobConflictError, match=r"\(none: by hand\)"):
            Launcher("ml-research", api).submit(ours)
    assert cluster.created == 0 and cluster.deleted == []


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom")
def test_kfp_retries_of_the_launcher_create_one_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_folder = RunFolder(str(tmp_path / "run"))
    Path(run_folder.uri).mkdir()
    # What the training job leaves behind, read by the step once the job succeeded.
    Path(run_folder.backbone_info).write_text(json.dumps({"arch": "resnet50", "step": 10}))
    Path(run_folder.train_log).write_text(json.dumps({"step": 10, "loss": 0.5}) + "\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    config = launch_config(
        pretrain=dataclasses.replace(launch_config().pretrain, out=run_folder.uri)
    )
    launch = json.dumps(dataclasses.asdict(config))

    @dsl.pipeline
    def launched_twice(launch: str) -> None:
        dataset = dsl.importer(artifact_uri=str(shards), artifact_class=dsl.Dataset)
        arguments = {
            "dataset": dataset.output, "launch": launch, "backend": "pytorchjob",
            "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        }  # fmt: skip
        first = pretrain(**arguments)
        # The same step again in the same run: what KFP's set_retry does after a lost pod.
        pretrain(**arguments).after(first)

    with fake_kubernetes(Script("Succeeded", after_polls=0)) as (cluster, api):
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.configuration.host}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))  # fmt: skip
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
        launched_twice(launch=launch)
    assert cluster.created == 1 and cluster.deleted == []
    [job] = cluster.jobs.values()
    owner = job["metadata"]["labels"][OWNER_LABEL]
    assert owner and owner != "{{$.pipeline_job_uuid}}"  # the run's id, resolved by KFP
    assert math.isfinite(float(job["spec"]["runPolicy"]["backoffLimit"]))
