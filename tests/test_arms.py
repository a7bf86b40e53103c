"""The arms of a run: one folder, job, label set and Pushgateway group per method and seed."""

import dataclasses
import json
import re

import pytest
from crd_schemas import crd_errors
from fake_kubernetes import Script, fake_kubernetes
from test_launch import launch_config

from ladder_siam.kube.arms import JOB_NAME_CHARS, arm_name, job_name, plan_arms
from ladder_siam.kube.launch import Launcher
from ladder_siam.kube.launch_config import (
    ARM_LABEL,
    METHOD_LABEL,
    OWNER_LABEL,
    LaunchConfig,
    method_label,
)
from ladder_siam.kube.pytorchjob import build_pytorchjob
from ladder_siam.pipelines.runs import load_params
from ladder_siam.runtime.run_folder import run_of
from ladder_siam.runtime.typed_config import config_from_dict

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RUN_URI = "s3://bucket/ladder-siam/runs/sweep"


def arms(methods: list, seeds: list) -> list[LaunchConfig]:
    base = launch_config(run_id="sweep")
    return [
        config_from_dict(LaunchConfig, json.loads(plan.launch), "arm")
        for plan in plan_arms(base, RUN_URI, methods, seeds)
    ]


def test_every_method_and_seed_is_an_arm_with_its_own_folder_job_and_labels() -> None:
    launches = arms(["byol", "ladder-byol"], [0, 1.0, 2])  # KFP may hand seeds over as floats
    assert [(c.pretrain.method, c.pretrain.seed) for c in launches] == [
        ("byol", 0), ("byol", 1), ("byol", 2),
        ("ladder-byol", 0), ("ladder-byol", 1), ("ladder-byol", 2),
    ]  # fmt: skip
    assert len({c.name for c in launches}) == len({c.pretrain.out for c in launches}) == 6
    for config in launches:
        assert config.pretrain.out == f"{RUN_URI}/arms/{config.arm}"
        assert config.arm == f"{config.pretrain.method}-s{config.pretrain.seed}"
        # Its pushed metrics are grouped by arm: two arms never overwrite each other's.
        assert run_of(config.pretrain.out + "/eval/linear_probe") == f"sweep/{config.arm}"
        job = build_pytorchjob(config)
        assert crd_errors(job) == []
        labels = job["metadata"]["labels"]
        assert labels[ARM_LABEL] == config.arm and labels["ladder-siam/run-id"] == "sweep"
        pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]
        assert pod_labels["labels"][ARM_LABEL] == config.arm


def test_job_names_stay_short_enough_for_the_operators_service_names() -> None:
    run = "a-very-long-run-name-for-a-sweep-of-all-m"  # 41 characters
    names = {job_name(run, arm_name(m, s)) for m in ("ladder-dense-byol", "DDG-") for s in (7, 8)}
    assert len(names) == 4
    for name in names:
        # The operator adds "-worker-10"; a Service name is a DNS-1035 label of <= 63.
        assert len(name) <= JOB_NAME_CHARS and len(f"{name}-worker-10") <= 63
        assert DNS_1035.fullmatch(name), name
    assert job_name("demo", "byol-s0") == "ladder-siam-demo-byol-s0"
    assert arm_name("DDG-", 3) == "ddg-s3"


@pytest.mark.parametrize(
    ("methods", "seeds", "message"),
    [
        ([], [0], "pretrain_methods: empty"),
        (["byol", "---G"], [0], "'byol' and '---G' are the same method"),
        (["simclr"], [0], "method 'simclr'"),
        (["byol"], [], "pretrain_seeds: empty"),
        (["byol"], [1, 1], "each seed once"),
        (["byol"], [-1], "0 or more"),
        (["byol"], ["zero"], "'zero' is not an integer"),
        (["byol"], [float("inf")], "inf is not an integer"),
    ],
)
def test_bad_method_or_seed_lists_are_named(methods: list, seeds: list, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        arms(methods, seeds)


def test_a_retried_launcher_adopts_only_its_own_arms_job() -> None:
    byol, ladder = arms(["byol", "ladder-byol"], [0])
    byol, ladder = (dataclasses.replace(c, owner="kfp-run-a") for c in (byol, ladder))
    with fake_kubernetes(Script(outcome=None)) as (cluster, api):
        launcher = Launcher("ml-research", api)
        first = launcher.submit(build_pytorchjob(byol))
        # The other arm of the same KFP run gets a job of its own, not byol's.
        second = launcher.submit(build_pytorchjob(ladder))
        # KFP retried byol's launcher: it adopts byol's job, and only that one.
        assert launcher.submit(build_pytorchjob(byol)) == first
    assert first != second and cluster.created == 2 and cluster.deleted == []
    assert {name: job["metadata"]["labels"][ARM_LABEL] for name, job in cluster.jobs.items()} == {
        first: "byol-s0",
        second: "ladder-byol-s0",
    }
    assert {job["metadata"]["labels"][OWNER_LABEL] for job in cluster.jobs.values()} == {
        "kfp-run-a"
    }


def test_a_params_file_with_the_old_single_method_names_its_replacement(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("pretrain_method: byol\n")
    with pytest.raises(ValueError, match="pretrain_method: replaced by pretrain_methods"):
        load_params(str(params), [])
    assert load_params(None, ["pretrain_methods=[byol, ladder-byol]", "pretrain_seeds=[0, 1]"]) == {
        "pretrain_methods": ["byol", "ladder-byol"],
        "pretrain_seeds": [0, 1],
    }


def test_a_level_string_method_labels_its_pods_with_a_valid_label() -> None:
    [config] = arms(["-GGG"], [0])
    assert config.arm == "ggg-s0" and config.pretrain.method == "-GGG"
    job = build_pytorchjob(config)
    assert crd_errors(job) == []
    assert job["metadata"]["labels"][METHOD_LABEL] == "levels-_GGG"
    assert method_label("ladder-byol") == "ladder-byol" and method_label("DDGG") == "DDGG"
