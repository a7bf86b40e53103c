"""The Kubernetes manifests: rendered by kustomize, validated against the Kubernetes and CRD
schemas, hardened, their alerts unit-tested by promtool and their dashboard queried on a real
Prometheus."""

from __future__ import annotations

import base64
import copy
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import torch
import yaml
from crd_schemas import crd_errors, crd_schemas
from prometheus_servers import prometheus_server, query, wait_for_query
from system_tools import free_port, require_tool

from ladder_siam.kube import pod as hardened
from ladder_siam.kube.launch_config import SCHEDULERS
from ladder_siam.kube.trainjob import NODE, RUNTIME_METRICS_PORT, runtime_name
from ladder_siam.pretrain.config import config_from_args
from ladder_siam.pretrain.train import get_args_parser
from ladder_siam.runtime.metrics import TrainingMetrics

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# Every test renders the manifests with kubectl kustomize (the module-scoped `rendered`).
pytestmark = pytest.mark.integration

KUBERNETES_VERSION = "1.32"  # kubectl's here; kubernetes-validate ships its schemas
KUSTOMIZATIONS = ("base", "examples", "overlays/kubeflow-profile", "trainer")
PROFILE_NAMESPACE = "kubeflow-user-example-com"
CREDENTIALS = "s3-credentials.env"
TRAINER_LABELS = {
    "app.kubernetes.io/name": "ladder-siam",
    "app.kubernetes.io/component": "pretrain",
}


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    kubectl = require_tool("kubectl")
    return subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ whose credentials file holds dummy values, as an operator would fill it."""
    copied = tmp_path_factory.mktemp("manifests") / "k8s"
    shutil.copytree(K8S, copied, ignore=shutil.ignore_patterns(CREDENTIALS))
    example = (K8S / "base" / f"{CREDENTIALS}.example").read_text().splitlines()
    keys = [line.split("=", 1)[0] for line in example if "=" in line and not line.startswith("#")]
    (copied / "base" / CREDENTIALS).write_text("".join(f"{key}=dummy-{key}\n" for key in keys))
    return copied


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    objects = {}
    for name in KUSTOMIZATIONS:
        result = kustomize(tree / name)
        assert result.returncode == 0, result.stderr
        objects[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return objects


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Against its CRD's schema if it is a custom resource, else the Kubernetes API's."""
    if (obj["apiVersion"], obj["kind"]) in crd_schemas():
        return crd_errors(obj)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [str(error)]
    return []


def pod_templates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod template: the PyTorchJobs' replicas (no other kind here runs pods)."""
    return [
        replica["template"]
        for job in find(objects, "PyTorchJob")
        for replica in job["spec"]["pytorchReplicaSpecs"].values()
    ]


def test_every_kustomization_renders_objects_of_the_expected_kinds(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    base_kinds = sorted(obj["kind"] for obj in rendered["base"])
    assert base_kinds == sorted(
        ("ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap", "ConfigMap",
         "PodMonitor", "PrometheusRule")
    )  # fmt: skip
    assert [obj["kind"] for obj in rendered["examples"]] == ["PyTorchJob"]
    # Every pipeline step reads the Pushgateway address from this ConfigMap (optional).
    settings = [
        obj
        for obj in find(rendered["base"], "ConfigMap")
        if obj["metadata"]["name"] == "ladder-siam-settings"
    ]
    assert settings[0]["data"]["PUSHGATEWAY_URL"].startswith("http://")
    assert sorted(obj["kind"] for obj in rendered["overlays/kubeflow-profile"]) == base_kinds
    # One Trainer v2 runtime per scheduler, named as the launcher's TrainJobs refer to them.
    runtimes = {obj["metadata"]["name"] for obj in find(rendered["trainer"], "TrainingRuntime")}
    assert runtimes == {runtime_name(scheduler) for scheduler in SCHEDULERS}
    assert len(rendered["trainer"]) == len(runtimes)


def runtime_pod(runtime: dict[str, Any]) -> dict[str, Any]:
    [job] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == NODE
    return job["template"]["spec"]["template"]


def test_the_trainer_runtimes_harden_their_pods_as_the_pytorchjob_does(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for runtime in find(rendered["trainer"], "TrainingRuntime"):
        name, template = runtime["metadata"]["name"], runtime_pod(runtime)
        pod = template["spec"]
        assert template["metadata"]["annotations"] == hardened.POD_ANNOTATIONS, name
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"] == hardened.pod_security(1000), name
        assert pod["volumes"] == hardened.volumes("32Gi", "100Gi"), name
        [container] = pod["containers"]
        assert container["name"] == NODE
        assert container["securityContext"] == hardened.container_security(1000), name
        assert container["volumeMounts"] == hardened.VOLUME_MOUNTS, name
        assert container["ports"] == [
            {"name": "metrics", "containerPort": RUNTIME_METRICS_PORT, "protocol": "TCP"}
        ]
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", **template}, KUBERNETES_VERSION, strict=True
        )
        # A gang runtime schedules its pods with its gang scheduler and a PodGroup policy.
        scheduler = next(s for s in SCHEDULERS if runtime_name(s) == name)
        assert pod.get("schedulerName") == SCHEDULERS[scheduler], name
        assert ("podGroupPolicy" in runtime["spec"]) == (scheduler != "default"), name


@pytest.mark.slow
def test_every_object_validates_against_its_schema(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for objects in rendered.values():
        for obj in objects:
            assert schema_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
        # The replica templates once more as Pods, against the full Kubernetes Pod schema.
        for template in pod_templates(objects):
            pod = {"apiVersion": "v1", "kind": "Pod", **template}
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    [monitor] = find(rendered["base"], "PodMonitor")
    broken = copy.deepcopy(monitor)
    broken["spec"]["podMetricEndpoints"] = broken["spec"].pop("podMetricsEndpoints")
    assert any("podMetricEndpoints" in error for error in schema_errors(broken))
    [role] = find(rendered["base"], "Role")
    broken = copy.deepcopy(role)
    broken["rules"][0]["verb"] = broken["rules"][0].pop("verbs")
    assert schema_errors(broken) != []


def test_every_container_is_hardened_and_pinned(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    templates = [t for objects in rendered.values() for t in pod_templates(objects)]
    assert len(templates) == 2, "the example PyTorchJob has a Master and a Worker"
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"] + pod.get("initContainers", []):
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources[kind].keys(), (container["name"], kind)
            # Extended resources such as GPUs must request exactly their limit.
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["readOnlyRootFilesystem"] is True
            assert security.get("runAsNonRoot", True) is True
            name, _, tag = container["image"].rpartition("/")[2].partition(":")
            assert name and tag and tag != "latest", container["image"]


def test_the_example_job_runs_the_trainer_as_the_manifests_expect(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    [job] = find(rendered["examples"], "PyTorchJob")
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
    assert {"backoffLimit", "ttlSecondsAfterFinished"} <= job["spec"]["runPolicy"].keys()
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    [container] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"  # the training operator requires it
    command = container["command"]
    assert command[0] == "torchrun"
    assert command[command.index("-m") + 1] == "ladder_siam.pretrain"

    # Its trainer arguments parse and make a valid config, the packaged preset included.
    launcher = {arg.split("=")[0]: arg.split("=")[1] for arg in command[1 : command.index("-m")]}
    arguments = command[command.index("-m") + 2 :]
    config = config_from_args(get_args_parser().parse_args(arguments))
    config.validate(world_size=int(launcher["--nnodes"]) * int(launcher["--nproc-per-node"]))
    assert int(launcher["--max-restarts"]) >= 1, "a lost worker must not fail the pod"

    # The port the trainer serves is the named port the PodMonitor scrapes.
    [port] = [port for port in container["ports"] if port["name"] == "metrics"]
    assert port["containerPort"] == config.metrics_port
    [monitor] = find(rendered["base"], "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == TRAINER_LABELS
    assert [(e["port"], e["path"]) for e in monitor["spec"]["podMetricsEndpoints"]] == [
        ("metrics", "/metrics")
    ]
    for template in pod_templates([job]):
        assert TRAINER_LABELS.items() <= template["metadata"]["labels"].items()
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        mounts = {
            m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]
        }
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in volumes[mounts["/tmp"]]  # HOME and caches on a read-only root

    # Its credentials come from the Secret the base generates.
    [secret] = find(rendered["base"], "Secret")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]


def test_the_launcher_role_grants_only_what_the_launcher_needs(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    [role] = find(rendered["base"], "Role")
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    jobs = {
        (group, plural, v)
        for group, plural in (
            ("kubeflow.org", "pytorchjobs"),
            ("trainer.kubeflow.org", "trainjobs"),
        )
        for v in ("create", "get", "list", "watch", "delete")
    }
    reads = {("", r, v) for r in ("pods", "pods/log", "events") for v in ("get", "list", "watch")}
    assert grants == jobs | reads
    [binding] = find(rendered["base"], "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    [account] = find(rendered["base"], "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]


def test_the_profile_overlay_puts_everything_in_the_profile_namespace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["overlays/kubeflow-profile"]
    assert {obj["metadata"]["namespace"] for obj in objects} == {PROFILE_NAMESPACE}
    [binding] = find(objects, "RoleBinding")
    subjects = {(s["name"], s["namespace"]) for s in binding["subjects"]}
    assert subjects == {
        ("ladder-siam-launcher", PROFILE_NAMESPACE),
        ("default-editor", PROFILE_NAMESPACE),
    }


def test_credentials_come_only_from_the_uncommitted_env_file(
    rendered: dict[str, list[dict[str, Any]]], tree: Path
) -> None:
    [secret] = find(rendered["base"], "Secret")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == {key: f"dummy-{key}" for key in decoded}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= decoded.keys()

    # The committed example names the keys and holds no secret value, only a region: without
    # one, boto3 cannot reach AWS S3.
    example = (K8S / "base" / f"{CREDENTIALS}.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
    assert values == {
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "",
        "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    # No committed manifest carries a Secret; git ignores the real env file.
    for path in K8S.rglob("*.yaml"):
        documents = yaml.safe_load_all(path.read_text())
        assert "Secret" not in {doc.get("kind") for doc in documents if isinstance(doc, dict)}
    git = require_tool("git")
    ignored = subprocess.run(
        [git, "-C", str(REPO), "check-ignore", "-q", f"k8s/base/{CREDENTIALS}"], check=False
    )
    assert ignored.returncode == 0, f"k8s/base/{CREDENTIALS} is not git-ignored"

    # Without the env file the base refuses to render rather than generate an empty Secret.
    (tree / "base" / CREDENTIALS).rename(tree / "base" / "moved.env")
    try:
        result = kustomize(tree / "base")
    finally:
        (tree / "base" / "moved.env").rename(tree / "base" / CREDENTIALS)
    assert result.returncode != 0 and CREDENTIALS in result.stderr


@pytest.fixture(scope="module")
def rule_files(
    rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The PrometheusRule's groups as a Prometheus rules file, beside a copy of the unit tests."""
    directory = tmp_path_factory.mktemp("rules")
    [rule] = find(rendered["base"], "PrometheusRule")
    (directory / "ladder-siam-rules.yaml").write_text(json.dumps(rule["spec"]))
    shutil.copy(K8S / "base" / "alerts_test.yaml", directory / "alerts_test.yaml")
    return directory


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(rule_files: Path) -> None:
    promtool = require_tool("/usr/bin/promtool")
    for command in (
        ["check", "rules", "ladder-siam-rules.yaml"],
        ["test", "rules", "alerts_test.yaml"],
    ):
        result = subprocess.run(
            [promtool, *command], cwd=rule_files, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires(rule_files: Path) -> None:
    rules = json.loads((rule_files / "ladder-siam-rules.yaml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {
        "LadderSiamTrainingStalled", "LadderSiamNonFiniteLoss", "LadderSiamJobFailed",
        "LadderSiamRankCollapse",
    } <= alerts  # fmt: skip
    tests = yaml.safe_load((rule_files / "alerts_test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == alerts


def dashboard_queries(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """Panel title -> its PromQL, from the ConfigMap Grafana's sidecar loads."""
    [config_map] = [
        obj
        for obj in find(rendered["base"], "ConfigMap")
        if "grafana_dashboard" in obj["metadata"].get("labels", {})
    ]
    assert config_map["metadata"]["name"] == "ladder-siam-dashboard"
    [text] = config_map["data"].values()
    panels = json.loads(text)["panels"]
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in panels}


def test_the_dashboard_has_the_panels_and_every_query_reads_our_metrics(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    queries = dashboard_queries(rendered)
    assert set(queries) == {
        "Loss per level", "Output std per level", "Online probe top-1 per stage",
        "RankMe per stage", "Learning rate", "EMA rate τ", "Images/s", "Step duration",
        "Data-wait fraction", "GPU memory",
    }  # fmt: skip
    for expressions in queries.values():
        for expr in expressions:
            # Every query reads ladder_siam_ series, filtered by the dashboard's job picker.
            assert "ladder_siam_" in expr and 'training_kubeflow_org_job_name=~"$job"' in expr


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TrainingMetrics, int]]:
    # No GPU here: stand in for CUDA's memory counters so the GPU panel has series to show.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 3 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5 << 30)
    metrics = TrainingMetrics(method="DDGG", arch="resnet18")
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    yield metrics, port
    metrics.close()


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    rendered: dict[str, list[dict[str, Any]]],
    exporter: tuple[TrainingMetrics, int],
    tmp_path: Path,
) -> None:
    metrics, port = exporter
    queries = dashboard_queries(rendered)
    with prometheus_server([f"127.0.0.1:{port}"], tmp_path) as prometheus:
        wait_for_query(prometheus, f'up{{instance="127.0.0.1:{port}"}} == 1')
        # Steps across several 1 s scrapes, so that every rate() sees its counters grow.
        for epoch in range(4):
            for _ in range(4):
                metrics.record_step(batch_size=8, duration_s=0.3, data_wait_s=0.1)
            losses = {"res2": 0.5, "res3": 0.6, "res4": 0.7, "res5": 0.8, "total": 2.6}
            spread = {"res2": 0.1, "res3": 0.1, "res4": 0.1, "res5": 0.1}
            metrics.record_interval(losses, spread, 0.5, 0.99, 64.0, epoch)
            probe = {"res2": 30.0, "res3": 35.0, "res4": 40.0, "res5": 50.0}
            metrics.record_monitor(probe, {"res2": 20.0, "res5": 150.0}, {"res5": 60.0})
            time.sleep(1.1)
        for title, expressions in queries.items():
            for expr in expressions:
                # Grafana's "All" for the job picker, and a rate window of 15 scrapes.
                promql = expr.replace("$job", ".*").replace("$__rate_interval", "15s")
                # "> -Inf" keeps finite values only: a 0/0 or an empty histogram gives NaN.
                series = wait_for_query(prometheus, f"({promql}) > -Inf", timeout=10)
                assert all(math.isfinite(float(s["value"][1])) for s in series), (title, series)
        fraction = queries["Data-wait fraction"][0].replace("$job", ".*")
        [series] = query(prometheus, fraction.replace("$__rate_interval", "15s"))
        assert float(series["value"][1]) == pytest.approx(0.1 / 0.3, rel=0.05)
