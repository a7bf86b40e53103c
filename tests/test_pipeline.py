"""The Kubeflow pipeline: its compiled YAML (committed, valid IR, the DAG users see), its first
step's validation and fingerprints, and whole runs through kfp.local, the real KFP executor."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schemas import crd_errors
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from ladder_siam import cli
from ladder_siam.components import IMAGE
from ladder_siam.io import storage
from ladder_siam.io.s3 import CREDENTIAL_VARIABLES
from ladder_siam.kube.inputs import (
    PipelineInputs,
    plan_run,
    prepare_parts,
    pretrain_config,
    run_name,
)
from ladder_siam.kube.pytorchjob import build_pytorchjob
from ladder_siam.kube.steps import launch_config_from_json, plan_arms
from ladder_siam.pipelines.ladder_siam import (
    MAX_PARALLEL_ARMS,
    SETTINGS_CONFIG_MAP,
    STEPS_S3_SECRET,
)
from ladder_siam.pipelines.runs import COMPILED, run_local
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.pretrain.config import config_from_args, preset_names, resolve_preset
from ladder_siam.pretrain.train import get_args_parser
from ladder_siam.report.comparisons import NO_SPREAD

REPO = Path(__file__).parents[1]
STAGES = ("res2", "res3", "res4", "res5")
EVAL_STEPS = ("finetune-detection", "finetune-segmentation", "linear-probe")
# Steps that hold a GPU themselves; the others that train submit a job whose pods hold them.
GPU_STEPS = ("linear-probe",)
LAUNCHERS = ("pretrain", "finetune-detection", "finetune-segmentation")
# The exit handler's task that loops over the arms (KFP names it), after the three sources'
# loops over their preparation parts.
LOOP = "for-loop-5"
PART_LOOPS = ("for-loop-2", "for-loop-3", "for-loop-4")
ARM_STEPS = ("pretrain", *EVAL_STEPS)


@pytest.fixture(scope="module")
def compiled() -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The steps inside the exit handler and inside its loop over the arms, by name."""
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    inner = loop_tasks(spec, LOOP)
    return {**{name: task for name, task in outer.items() if "for-loop" not in name}, **inner}


def loop_tasks(spec: dict[str, Any], loop: str) -> dict[str, dict[str, Any]]:
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    return spec["components"][outer[loop]["componentRef"]["name"]]["dag"]["tasks"]


def component(task: dict[str, Any]) -> str:
    """The step a task runs: its component's name without KFP's comp- prefix and -N suffix."""
    name = task["componentRef"]["name"].removeprefix("comp-")
    return name.rsplit("-", 1)[0] if name[-1].isdigit() else name


def ancestors(graph: dict[str, dict[str, Any]], name: str) -> set[str]:
    found: set[str] = set()
    stack = list(graph[name].get("dependentTasks", []))
    while stack:
        parent = stack.pop()
        if parent not in found:
            found.add(parent)
            stack += graph[parent].get("dependentTasks", [])
    return {component(graph[parent]) for parent in found}


def test_the_committed_yaml_is_what_the_code_compiles_to(tmp_path: Path) -> None:
    fresh = tmp_path / "ladder_siam.yaml"
    assert cli.main(["pipeline", "compile", "--out", str(fresh)]) == 0
    assert fresh.read_bytes() == COMPILED.read_bytes(), (
        "pipelines/ladder_siam.yaml is stale: run `ladder-siam pipeline compile` and commit it"
    )


def test_the_yaml_is_valid_kfp_ir(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, _ = compiled
    parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert parsed.pipeline_info.name == "ladder-siam"
    platform = yaml.safe_load_all(COMPILED.read_text())
    json_format.ParseDict(list(platform)[1], pipeline_spec_pb2.PlatformSpec())


def test_shards_are_prepared_once_then_every_arm_trains_and_is_evaluated_then_one_report(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    graph = tasks(spec)
    steps = sorted(component(task) for task in graph.values())
    assert steps == sorted(
        ["check-inputs", *["plan-parts", "prepare-shards"] * 3, "plan-arms", *ARM_STEPS,
         "report"]
    )  # fmt: skip
    # Outside the loop: the inputs' check, the shards (once for every arm), the arms' plan and
    # the report; inside it, one pretraining and three evaluations per arm.
    assert sorted(component(outer[name]) for name in outer if "for-loop" not in name) == sorted(
        ["check-inputs", *["plan-parts", "prepare-shards"] * 3, "plan-arms", "report"]
    )
    # Each source's shards are written by its parts (its plan-parts' list) before the task
    # that commits them; one part is no iteration at all.
    for loop, (plan, commit) in zip(PART_LOOPS, [("plan-parts", "prepare-shards"),
                                                 ("plan-parts-2", "prepare-shards-2"),
                                                 ("plan-parts-3", "prepare-shards-3")],
                                    strict=True):  # fmt: skip
        assert outer[loop]["parameterIterator"]["items"] == {
            "inputParameter": f"pipelinechannel--{plan}-Output"
        }
        # Only the item and the pipeline's parameters go in (see steps.plan_parts).
        inputs = outer[loop]["inputs"]["parameters"].values()
        assert [i["taskOutputParameter"]["producerTask"] for i in inputs
                if "taskOutputParameter" in i] == [plan]  # fmt: skip
        assert [component(task) for task in loop_tasks(spec, loop).values()] == [
            "prepare-shards-part"
        ]
        assert loop in outer[commit]["dependentTasks"]
    loop = outer[LOOP]
    assert loop["parameterIterator"]["items"] == {
        "inputParameter": "pipelinechannel--plan-arms-Output"
    }
    assert loop["iteratorPolicy"]["parallelismLimit"] == MAX_PARALLEL_ARMS
    assert set(loop["dependentTasks"]) == {"plan-arms", "prepare-shards", "prepare-shards-2",
                                           "prepare-shards-3"}  # fmt: skip
    inner = {component(task): name for name, task in graph.items() if name not in outer}
    assert set(inner) == set(ARM_STEPS)
    for step in EVAL_STEPS:
        # Each evaluation waits for its arm's pretraining only, never for another evaluation.
        assert graph[inner[step]]["dependentTasks"] == ["pretrain"]
    # The report collects every arm's backbone and evaluations: it waits for the whole loop.
    assert LOOP in outer["report"]["dependentTasks"]
    collected = outer["report"]["inputs"]["artifacts"]
    assert set(collected) >= {"models", "linear_probe_metrics", "detection_metrics",
                              "segmentation_metrics"}  # fmt: skip
    for name in ("models", "linear_probe_metrics"):
        assert collected[name]["taskOutputArtifact"]["producerTask"] == LOOP
    # The exit handler runs whatever happened inside, and reads the final status.
    exit_task = spec["root"]["dag"]["tasks"]["record-status"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert exit_task["dependentTasks"] == ["exit-handler-1"]


def test_only_the_fingerprint_step_skips_the_cache(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    caching = {name: task.get("cachingOptions", {}) for name, task in tasks(spec).items()}
    assert caching.pop("check-inputs") == {}  # enableCache false is the proto default
    assert all(options == {"enableCache": True} for options in caching.values())
    # Shard preparation is keyed on the source's fingerprint, so new data misses the cache.
    for task in tasks(spec).values():
        if component(task) == "prepare-shards":
            fingerprint = task["inputs"]["parameters"]["fingerprint"]
            assert fingerprint["taskOutputParameter"]["producerTask"] == "check-inputs"


def test_steps_run_the_project_image_without_installing_anything(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == IMAGE, name
        assert not any("pip install" in part for part in container["command"]), name
        resources = container.get("resources", {})
        gpu = resources.get("accelerator", {})
        if name.removeprefix("exec-") in GPU_STEPS:
            assert (gpu["resourceType"], gpu["resourceCount"]) == ("nvidia.com/gpu", "1"), name
        else:
            assert gpu == {}, f"{name} must not hold a GPU"
        if name.removeprefix("exec-") in LAUNCHERS:
            assert resources["memoryLimit"] <= 2 * 2**30, name


def test_every_step_gets_credentials_and_settings_and_gpu_steps_their_nodes(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, platform = compiled
    kustomized = (REPO / "k8s" / "base" / "kustomization.yaml").read_text()
    # The names the pipeline uses are the ones k8s/base creates.
    assert f"name: {STEPS_S3_SECRET}" in kustomized
    assert f"name: {SETTINGS_CONFIG_MAP}" in kustomized
    assert set(platform) == set(spec["deploymentSpec"]["executors"])
    for name, config in platform.items():
        # Optional: with cloud identities there is no Secret, and the steps still start.
        [secret] = config["secretAsEnv"]
        assert secret["secretName"] == STEPS_S3_SECRET and secret["optional"], name
        assert {entry["envVar"] for entry in secret["keyToEnv"]} == set(CREDENTIAL_VARIABLES)
        [settings] = config["configMapAsEnv"]
        assert settings["configMapName"] == SETTINGS_CONFIG_MAP and settings["optional"]
        [namespace] = config["fieldPathAsEnv"]
        assert namespace == {"name": "POD_NAMESPACE", "fieldPath": "metadata.namespace"}
        if name.removeprefix("exec-") in GPU_STEPS:
            assert config["nodeSelector"]["nodeSelectorJson"] == {
                "componentInputParameter": "pipelinechannel--cluster_gpu_node_selector"
            }
            assert config["tolerations"] == [
                {
                    "tolerationJson": {
                        "componentInputParameter": "pipelinechannel--cluster_gpu_tolerations"
                    }
                }
            ]
            [shm] = config["emptyDirMounts"]
            assert (shm["mountPath"], shm["medium"]) == ("/dev/shm", "Memory")
        else:
            assert "nodeSelector" not in config and "tolerations" not in config, name


def test_steps_whose_rerun_is_harmless_are_retried_with_backoff(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    retried = {
        component(task)
        for task in tasks(spec).values()
        if task.get("retryPolicy", {}).get("maxRetryCount", 0) >= 1
    }
    assert retried == {
        "prepare-shards", "pretrain", "linear-probe", "finetune-detection",
        "finetune-segmentation", "report",
    }  # fmt: skip
    policy = tasks(spec)["pretrain"]["retryPolicy"]
    assert policy["backoffDuration"] == "60s" and policy["backoffFactor"] == 2.0
    # Each launcher learns its KFP run's id, which labels the job it adopts on a retry.
    for launcher in ("pretrain", "finetune-detection", "finetune-segmentation"):
        run_id = tasks(spec)[launcher]["inputs"]["parameters"]["kfp_run_id"]
        assert run_id == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}


def test_the_run_form_lists_the_parameters_by_group(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    names = list(spec["root"]["inputDefinitions"]["parameters"])
    groups = ("data_", "pretrain_", "eval_", "cluster_", "report_")
    assert all(name.startswith(groups) for name in names), names
    # KFP's form is alphabetical: each group's parameters sit together.
    assert names == sorted(names)


def test_parameters_have_defaults_that_make_sense_in_the_ui(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    defaults = {
        name: parameter.get("defaultValue")
        for name, parameter in spec["root"]["inputDefinitions"]["parameters"].items()
    }
    assert defaults["pretrain_methods"] == ["ladder-byol"] and defaults["pretrain_seeds"] == [0]
    assert defaults["pretrain_arch"] == "resnet50"
    assert (
        defaults["pretrain_nodes"],
        defaults["pretrain_gpus_per_node"],
        defaults["pretrain_batch_size"],
    ) == (4, 8, 4096)
    assert defaults["cluster_launch_backend"] == "pytorchjob" and defaults["cluster_image"] == IMAGE
    assert defaults["pretrain_config"] in preset_names()
    assert "A100" in next(iter(defaults["cluster_gpu_node_selector"].values()))
    for uri in (
        "data_source_uri",
        "data_detection_uri",
        "data_segmentation_uri",
        "data_output_uri",
    ):
        assert defaults[uri].startswith("s3://"), uri
    # Every parameter is explained where the UI and `--help` readers look: the docstring.
    docstring = (REPO / "pipelines" / "ladder_siam.py").read_text()
    for name in defaults:
        assert f"        {name}: " in docstring, f"{name} is not documented"


# How KFP's IR names the type of each PipelineInputs field's annotation.
KFP_TYPES = {
    "str": "STRING", "int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE", "bool": "BOOLEAN",
    "list[str]": "LIST", "list[int]": "LIST", "dict[str, str]": "STRUCT",
    "list[dict[str, Any]]": "LIST",
}  # fmt: skip


def test_the_pipeline_the_first_step_and_the_library_agree_on_every_parameter(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    spec, _ = compiled
    ui = spec["root"]["inputDefinitions"]["parameters"]
    check_inputs = spec["components"]["comp-check-inputs"]["inputDefinitions"]["parameters"]
    library = {item.name: item for item in dataclasses.fields(PipelineInputs)}
    assert set(ui) == set(library), "the UI's parameters are PipelineInputs' fields"
    assert set(check_inputs) == {*library, "job_name"}, "check-inputs validates every one"
    defaults = PipelineInputs()
    for name, item in library.items():
        kfp_type = KFP_TYPES[str(item.type)]
        assert ui[name]["parameterType"] == check_inputs[name]["parameterType"] == kfp_type, name
        assert ui[name]["defaultValue"] == getattr(defaults, name), name


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    make_demo_data(str(root), images=40, size=48, val_fraction=0.25)
    return root


def inputs(sources: Path, output: Path, **overrides: Any) -> PipelineInputs:
    settings: dict[str, Any] = {
        "data_source_uri": str(sources / "imagefolder"),
        "data_detection_uri": str(sources / "coco"),
        "data_segmentation_uri": str(sources / "voc"),
        "data_output_uri": str(output),
        "cluster_namespace": "ml-research",
        "pretrain_config": "ladder-byol_r50_in1k_200ep",
        "cluster_gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "cluster_gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
    }
    settings.update(overrides)
    return PipelineInputs(**settings)


def test_the_pretrain_step_launches_four_nodes_of_eight_gpus_that_match_the_crd(
    sources: Path, tmp_path: Path
) -> None:
    settings = inputs(
        sources, tmp_path, pretrain_run_name="R50 Ladder_200ep", pretrain_sync_bn_scope="node"
    )
    plan = plan_run(settings, "ignored")
    assert plan.run_name == "r50-ladder-200ep"
    [arm] = plan_arms(plan.launch, plan.run_uri, ["ladder-byol"], [0])
    assert (arm["name"], arm["method"], arm["seed"]) == ("ladder-byol-s0", "ladder-byol", 0)
    launch = launch_config_from_json(arm["launch"])
    job = build_pytorchjob(launch)

    assert crd_errors(job) == []

    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["metadata"]["namespace"] == "ml-research"
    assert job["metadata"]["labels"]["ladder-siam/run-id"] == "r50-ladder-200ep"
    assert job["metadata"]["labels"]["ladder-siam/arm"] == "ladder-byol-s0"
    assert job["metadata"]["name"] == "ladder-siam-r50-ladder-200ep-ladder-byol-s0"
    pod = replicas["Worker"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert container["envFrom"] == [{"secretRef": {"name": "ladder-siam-s3"}}]
    # The trainer's config crosses KFP as typed data: the same config, ints still ints.
    out = str(tmp_path / "runs" / "r50-ladder-200ep" / "arms" / "ladder-byol-s0")
    dest = plan.datasets["pretrain"].dest
    assert launch.pretrain == pretrain_config(settings, dest, out)
    assert (launch.pretrain.shards, launch.pretrain.out) == (dest, out)
    assert launch.pretrain.sync_bn_scope == "node" and launch.pretrain.hidden_dim == 4096
    command = container["command"]
    sent = command[command.index("--config-json") + 1]
    assert config_from_args(get_args_parser().parse_args(["--config-json", sent])) == (
        launch.pretrain
    )
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 168 * 3600


def test_an_empty_sync_bn_scope_leaves_the_presets_own(sources: Path, tmp_path: Path) -> None:
    preset = tmp_path / "node.yaml"
    paper = Path(resolve_preset("ladder-byol_r50_in1k_200ep")).read_text()
    preset.write_text(paper + "sync_bn_scope: node\n")
    plan = plan_run(inputs(sources, tmp_path, pretrain_config=str(preset)), "job")
    assert launch_config_from_json(plan.launch).pretrain.sync_bn_scope == "node"


def test_every_bad_parameter_is_reported_at_once_before_any_work(
    sources: Path, tmp_path: Path
) -> None:
    bad = inputs(
        sources,
        tmp_path,
        data_source_uri="http://example.com/imagenet",
        pretrain_methods=["simclr"],
        pretrain_seeds=[0, 0.5],
        eval_probe_preset="huge",
        pretrain_nodes=0,
        eval_detection_gpus=3,
        report_compare_runs=[str(tmp_path / "no-such-run")],
    )
    with pytest.raises(ValueError) as error:
        plan_run(bad, "job")
    message = str(error.value)
    for expected in (
        "data_source_uri 'http://",
        "eval_probe_preset 'huge'",
        "pretrain_nodes 0",
        "method 'simclr'",
        "pretrain_seeds: 0.5 is not an integer",
        "eval_detection_gpus 3: --batch-size 16: must be divisible by world size 3",
        "no-such-run",
    ):
        assert expected in message
    assert not (tmp_path / "datasets").exists()

    # Settings that only clash together (4096 does not divide over 3 x 8 GPUs), reported
    # together with the launcher's own check of the image.
    with pytest.raises(ValueError) as error:
        plan_run(
            inputs(sources, tmp_path, pretrain_nodes=3, cluster_image="ladder-siam:latest"), "job"
        )
    assert "--batch-size 4096: must be divisible by world size 24" in str(error.value)
    assert "image 'ladder-siam:latest': pin a tag" in str(error.value)
    with pytest.raises(ValueError, match="'ladder-byol' and 'GGGG' are the same method"):
        plan_run(inputs(sources, tmp_path, pretrain_methods=["ladder-byol", "GGGG"]), "job")
    with pytest.raises(ValueError, match=r"pretrain_seeds \[1, 1\]: each seed once"):
        plan_run(inputs(sources, tmp_path, pretrain_seeds=[1, 1]), "job")
    with pytest.raises(ValueError, match="pretrain_methods: empty"):
        plan_run(inputs(sources, tmp_path, pretrain_methods=[]), "job")
    with pytest.raises(ValueError, match="--sync-bn-scope 'rack': expected all or node"):
        plan_run(inputs(sources, tmp_path, pretrain_sync_bn_scope="rack"), "job")
    for parts, problem in ((0, "at least 1"), (1000, "at most 256")):
        with pytest.raises(ValueError, match=f"data_prepare_parts {parts}: {problem}"):
            plan_run(inputs(sources, tmp_path, data_prepare_parts=parts), "job")
    assert (prepare_parts(3), prepare_parts(1)) == (["1/3", "2/3", "3/3"], [])


def test_the_fingerprint_follows_the_source_listing(sources: Path, tmp_path: Path) -> None:
    first = plan_run(inputs(sources, tmp_path), "job-1").datasets
    again = plan_run(inputs(sources, tmp_path), "job-2").datasets
    assert first == again  # unchanged data: the same shards folder, so a cache hit
    extra = sources / "voc" / "extra.txt"
    extra.write_text("a new file")
    try:
        changed = plan_run(inputs(sources, tmp_path), "job-3").datasets
    finally:
        extra.unlink()
    assert changed["segmentation"].fingerprint != first["segmentation"].fingerprint
    assert changed["segmentation"].dest != first["segmentation"].dest
    assert changed["pretrain"] == first["pretrain"]


def test_a_run_is_named_after_the_kfp_run_unless_named() -> None:
    assert (
        run_name("", "ladder-siam-2026-11-26-19-12-49-980452")
        == ("ladder-siam-2026-11-26-19-12-49-980452"[:40])
    )
    assert run_name("My Run #7", "x") == "my-run-7"
    assert run_name("", "7f2c-kfp-run") == "run-7f2c-kfp-run"
    with pytest.raises(ValueError, match="run_name"):
        run_name("", "---")


@pytest.fixture(scope="module")
def demo_params(sources: Path) -> Iterator[dict[str, Any]]:
    yield {
        "data_source_uri": str(sources / "imagefolder"),
        "data_detection_uri": str(sources / "coco"),
        "data_segmentation_uri": str(sources / "voc"),
        "pretrain_config": "tiny_cpu",
        "pretrain_arch": "resnet18",
        "pretrain_epochs": 1,
        "pretrain_batch_size": 8,
        "pretrain_nodes": 1,
        "pretrain_gpus_per_node": 1,
        "eval_probe_preset": "tiny",
        "eval_detection_preset": "tiny",
        "eval_segmentation_preset": "tiny",
        "data_shard_size": 10,
        "data_prepare_workers": 1,
    }


def status_of(output: Path, run: str) -> dict[str, Any]:
    return json.loads((output / "runs" / run / "pipeline_status.json").read_text())


@pytest.mark.slow
@pytest.mark.integration
def test_a_sweep_of_two_methods_and_two_seeds_runs_locally_and_compares_them(
    demo_params: dict[str, Any], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    run_local(
        {
            **demo_params,
            "data_output_uri": str(output),
            "pretrain_run_name": "sweep",
            "pretrain_methods": ["byol", "ladder-byol"],
            "pretrain_seeds": [0, 1],
            "data_prepare_parts": 2,
            # Four arms: the evaluations only need to run, not to learn.
            "eval_detection_preset": "smoke",
            "eval_segmentation_preset": "smoke",
        },
        str(tmp_path / "kfp"),
    )

    run = output / "runs" / "sweep"
    names = ["byol-s0", "byol-s1", "ladder-byol-s0", "ladder-byol-s1"]
    assert sorted(path.name for path in (run / "arms").iterdir()) == names
    # The plan's order (methods as listed, then seeds) for whoever reads the folder later.
    assert json.loads((run / "arms.json").read_text()) == names
    for arm in names:
        assert storage.exists(str(run / "arms" / arm / "backbone.pt")), arm
        for evaluation in ("linear_probe", "detection", "segmentation"):
            assert (run / "arms" / arm / "eval" / evaluation / "metrics.json").is_file(), arm
    # The shards were prepared once, for every arm: each source by two parts, then committed.
    datasets = sorted(path.name.rsplit("-", 1)[0] for path in (output / "datasets").iterdir())
    assert datasets == ["coco", "imagefolder", "voc"]
    [kfp_run] = (tmp_path / "kfp").iterdir()
    assert len(list(kfp_run.glob("**/prepare-shards-part*/"))) == 6
    assert status_of(output, "sweep")["state"] == "SUCCEEDED"

    summary = json.loads((run / "report" / "summary.json").read_text())
    arms = {(arm["method"], arm["seed"]): arm for arm in summary["arms"]}
    assert sorted(arms) == [("byol", 0), ("byol", 1), ("ladder-byol", 0), ("ladder-byol", 1)]
    for (method, seed), arm in arms.items():
        assert arm["run"] == str(run / "arms" / f"{method}-s{seed}")
        probe = json.loads(
            (Path(arm["run"]) / "eval" / "linear_probe" / "metrics.json").read_text()
        )
        assert arm["metrics"]["probe_top1_res3"] == round(probe["stages"]["res3"]["top1"], 2)
    comparisons = {entry["metric"]: entry for entry in summary["comparisons"]}
    expected = {f"{kind}_{stage}" for kind in ("probe_top1", "knn_top1") for stage in STAGES}
    assert set(comparisons) == expected | {"box_ap", "mask_ap", "miou"}
    for metric, entry in comparisons.items():
        assert (entry["method"], entry["baseline"], entry["seeds"]) == (
            "ladder-byol",
            "byol",
            [0, 1],
        )
        pairs = [
            arms[("ladder-byol", s)]["metrics"][metric] - arms[("byol", s)]["metrics"][metric]
            for s in (0, 1)
        ]
        assert entry["difference"] == pytest.approx(sum(pairs) / 2, abs=0.011), metric
        if len(set(pairs)) == 1 and pairs[0] != 0:
            # The same nonzero difference on both seeds: no spread to build an interval from.
            assert entry["ci95"] is None and entry["verdict"] == NO_SPREAD, metric
            continue
        low, high = entry["ci95"]
        assert low <= entry["difference"] <= high and "2 seeds" in entry["interval"], metric
        assert entry["verdict"] in ("better", "worse", "not distinguishable at 95 %")
    page = (run / "report" / "index.html").read_text()
    assert "Is the difference real?" in page and "Differences from byol" in page

    # KFP's own outputs: each arm's model points into its folder; the metrics are numbers.
    models = [
        json.loads(path.read_text())["artifacts"]["model"]["artifacts"][0]["metadata"]
        for path in kfp_run.glob("**/pretrain*/executor_output.json")
    ]
    assert sorted((m["method"], m["seed"], m["arm"]) for m in models) == [
        ("byol", 0, "byol-s0"), ("byol", 1, "byol-s1"),
        ("ladder-byol", 0, "ladder-byol-s0"), ("ladder-byol", 1, "ladder-byol-s1"),
    ]  # fmt: skip
    assert all(m["uri"] == str(run / "arms" / m["arm"] / "backbone.pt") for m in models)


@pytest.mark.integration
def test_a_bad_parameter_fails_the_run_before_any_step_and_is_recorded(
    demo_params: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    params = {
        **demo_params,
        "data_output_uri": str(output),
        "pretrain_run_name": "bad",
        "pretrain_methods": ["simclr"],
    }
    with pytest.raises(RuntimeError, match="check-inputs"):
        run_local(params, str(tmp_path / "kfp"))
    status = status_of(output, "bad")
    assert status["state"] == "FAILED"
    # The step's log (streamed by kfp.local) names the bad parameter: no other reason failed it.
    log = capfd.readouterr().out
    assert "invalid pipeline parameters:" in log and "method 'simclr'" in log
    [kfp_run] = (tmp_path / "kfp").iterdir()
    assert not (kfp_run / "prepare-shards").exists() and not (kfp_run / "pretrain").exists()
    assert not (output / "datasets").exists()
