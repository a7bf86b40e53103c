"""``ladder-siam pipeline submit|schedule`` against a fake KFP API server on loopback."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import kfp
import kfp_server_api
import pytest
import yaml
from fake_kfp import FakeKfp, fake_kfp

from ladder_siam import __version__, cli
from ladder_siam.pipelines.runs import COMPILED, compile_pipeline

WEEKLY = "0 0 3 * * 0"  # Sundays at 03:00, seconds first


pytestmark = pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")


@pytest.fixture
def kfp_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The client neither reads nor writes ~/.config/kfp, nor sees KF_PIPELINES_* variables."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in [name for name in os.environ if name.startswith("KF_PIPELINES_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("LADDER_SIAM_IMAGE", raising=False)


@pytest.fixture
def kfp_server(kfp_isolated: None) -> Iterator[tuple[FakeKfp, str]]:
    """A single-user fake KFP host."""
    with fake_kfp() as server:
        yield server


def committed_docs() -> list[dict]:
    """The committed pipeline YAML: the pipeline spec, then the Kubernetes platform spec."""
    return list(yaml.safe_load_all(COMPILED.read_text()))


def test_submit_starts_one_run_of_the_compiled_pipeline(kfp_server: tuple[FakeKfp, str]) -> None:
    state, url = kfp_server
    code = cli.main(
        ["pipeline", "submit", "--host", url, "--param", "pretrain_epochs=3",
         "--param", "data_source_uri=s3://b/imagenet", "--run-name", "r1"]
    )  # fmt: skip
    assert code == 0
    [experiment] = state.experiments
    assert experiment["display_name"] == "ladder-siam"
    [run] = state.runs
    assert run["display_name"] == "r1"
    assert run["experiment_id"] == experiment["experiment_id"]
    # The YAML has a platform spec (kfp-kubernetes settings), so kfp sends both documents.
    pipeline_spec, platform_spec = committed_docs()
    sent = run["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"] == pipeline_spec["pipelineInfo"]
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "ladder-siam"
    assert (
        sent["pipeline_spec"]["root"]["inputDefinitions"]
        == pipeline_spec["root"]["inputDefinitions"]
    )
    assert sent["platform_spec"] == platform_spec
    assert run["runtime_config"]["parameters"] == {
        "pretrain_epochs": 3,
        "data_source_uri": "s3://b/imagenet",
    }
    assert "pipeline_version_reference" not in run
    assert "service_account" not in run
    # A run from a package uploads nothing.
    assert state.pipelines == [] and state.uploads == [] and state.recurring_runs == []


def test_submit_reuses_the_experiment_and_passes_the_service_account(
    kfp_server: tuple[FakeKfp, str],
) -> None:
    state, url = kfp_server
    base = ["pipeline", "submit", "--host", url, "--experiment", "nightly"]
    assert cli.main([*base, "--run-name", "a"]) == 0
    assert cli.main([*base, "--run-name", "b", "--service-account", "ladder-siam-launcher"]) == 0
    [experiment] = state.experiments
    assert experiment["display_name"] == "nightly"
    assert [run["display_name"] for run in state.runs] == ["a", "b"]
    assert {run["experiment_id"] for run in state.runs} == {experiment["experiment_id"]}
    assert state.runs[1]["service_account"] == "ladder-siam-launcher"
    assert all(run["runtime_config"]["parameters"] == {} for run in state.runs)


def test_submit_into_a_profile_namespace(kfp_isolated: None) -> None:
    with fake_kfp(multi_user=True) as (state, url):
        code = cli.main(
            ["pipeline", "submit", "--host", url, "--namespace", "team-a", "--run-name", "r"]
        )
    assert code == 0
    # A namespace given, the client need not ask the server whether it is multi-user.
    assert state.requests[0] != "GET /apis/v2beta1/healthz"
    [experiment] = state.experiments
    assert experiment["namespace"] == "team-a"
    [run] = state.runs
    assert run["experiment_id"] == experiment["experiment_id"]


def test_schedule_uploads_a_version_once_and_creates_recurring_runs(
    kfp_server: tuple[FakeKfp, str], tmp_path: Path
) -> None:
    state, url = kfp_server
    args = ["pipeline", "schedule", "--host", url, "--cron", WEEKLY, "--param", "pretrain_epochs=3",
            "--service-account", "ladder-siam-launcher"]  # fmt: skip
    assert cli.main(args) == 0

    # What schedule uploads: this code's YAML, as a version named after release and hash.
    compile_pipeline(str(tmp_path / "expected.yaml"))
    expected = (tmp_path / "expected.yaml").read_text()
    version_name = f"{__version__}-{hashlib.sha256(expected.encode()).hexdigest()[:12]}"
    [pipeline] = state.pipelines
    assert pipeline["display_name"] == "ladder-siam"
    assert [(upload.kind, upload.text) for upload in state.uploads] == [
        ("pipeline", expected),
        ("version", expected),
    ]
    assert state.uploads[1].query["pipelineid"] == pipeline["pipeline_id"]
    assert state.uploads[0].docs()[0]["pipelineInfo"] == committed_docs()[0]["pipelineInfo"]
    # Uploading a pipeline creates its first version under its own name, as KFP does.
    assert [version["display_name"] for version in state.versions] == ["ladder-siam", version_name]
    version = state.versions[1]
    assert state.version_yaml(version["pipeline_version_id"]) == expected

    [experiment] = state.experiments
    assert experiment["display_name"] == "ladder-siam"
    [recurring] = state.recurring_runs
    assert recurring["display_name"] == "ladder-siam-weekly"
    assert recurring["trigger"] == {"cron_schedule": {"cron": WEEKLY}}
    assert recurring["max_concurrency"] == 1
    assert recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE"
    assert recurring["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert "pipeline_spec" not in recurring
    assert recurring["runtime_config"]["parameters"] == {"pretrain_epochs": 3}
    assert recurring["service_account"] == "ladder-siam-launcher"
    assert recurring["experiment_id"] == experiment["experiment_id"]

    # Unchanged code: the same pipeline and version, no upload, a second recurring run.
    assert cli.main([*args, "--job-name", "ladder-siam-weekly-2"]) == 0
    assert len(state.pipelines) == 1 and len(state.versions) == 2 and len(state.uploads) == 2
    assert len(state.experiments) == 1
    first, second = state.recurring_runs
    assert second["display_name"] == "ladder-siam-weekly-2"
    assert second["pipeline_version_reference"] == first["pipeline_version_reference"]
    assert second["recurring_run_id"] != first["recurring_run_id"]


def test_schedule_rejects_a_five_field_cron_before_calling_the_server(
    kfp_server: tuple[FakeKfp, str], caplog: pytest.LogCaptureFixture
) -> None:
    state, url = kfp_server
    code = cli.main(["pipeline", "schedule", "--host", url, "--cron", "0 3 * * 0"])
    assert code == 2
    assert "did you mean '0 0 3 * * 0'?" in caplog.text
    assert state.requests == []
    assert state.pipelines == [] and state.uploads == [] and state.recurring_runs == []


@pytest.mark.parametrize("action", [["submit"], ["schedule", "--cron", WEEKLY]])
def test_an_unknown_parameter_sends_nothing(
    kfp_server: tuple[FakeKfp, str], caplog: pytest.LogCaptureFixture, action: list[str]
) -> None:
    state, url = kfp_server
    code = cli.main(["pipeline", *action, "--host", url, "--param", "epoch=3"])
    assert code == 2
    assert "unknown pipeline parameters ['epoch']" in caplog.text
    assert state.requests == []


def test_param_overrides_the_params_file(kfp_server: tuple[FakeKfp, str], tmp_path: Path) -> None:
    state, url = kfp_server
    params = tmp_path / "params.yaml"
    params.write_text(
        "pretrain_epochs: 5\ndata_source_uri: s3://file/imagenet\npretrain_nodes: 2\n"
    )
    code = cli.main(
        ["pipeline", "submit", "--host", url, "--params", str(params),
         "--param", "pretrain_epochs=7", "--param", "report_compare_runs=[a, b]"]
    )  # fmt: skip
    assert code == 0
    [run] = state.runs
    assert run["runtime_config"]["parameters"] == {
        "pretrain_epochs": 7,
        "data_source_uri": "s3://file/imagenet",
        "pretrain_nodes": 2,
        "report_compare_runs": ["a", "b"],
    }


def test_the_fake_refuses_what_kfp_refuses(kfp_server: tuple[FakeKfp, str], tmp_path: Path) -> None:
    """The checks above lean on these: a second upload of a version name would fail."""
    state, url = kfp_server
    client = kfp.Client(host=url)
    package = str(tmp_path / "ladder_siam.yaml")
    compile_pipeline(package)
    assert client.get_pipeline_id("ladder-siam") is None
    with pytest.raises(ValueError, match="No experiment is found"):
        client.get_experiment(experiment_name="ladder-siam")
    pipeline_id = client.upload_pipeline(package, "ladder-siam").pipeline_id
    assert client.get_pipeline_id("ladder-siam") == pipeline_id
    with pytest.raises(kfp_server_api.ApiException) as conflict:
        client.upload_pipeline(package, "ladder-siam")
    assert conflict.value.status == 409
    client.upload_pipeline_version(package, "v1", pipeline_id=pipeline_id)
    with pytest.raises(kfp_server_api.ApiException) as conflict:
        client.upload_pipeline_version(package, "v1", pipeline_id=pipeline_id)
    assert conflict.value.status == 409
    versions = client.list_pipeline_versions(pipeline_id, page_size=1)
    assert [v.display_name for v in versions.pipeline_versions] == ["ladder-siam"]
    assert versions.total_size == 2 and versions.next_page_token
    experiment_id = client.create_experiment("e").experiment_id
    with pytest.raises(kfp_server_api.ApiException) as bad_cron:
        client.create_recurring_run(
            experiment_id, "j", cron_expression="0 3 * * 0", pipeline_package_path=package
        )
    assert bad_cron.value.status == 400
    assert state.recurring_runs == []
