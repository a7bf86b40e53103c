"""The first step: validate the parameters, name the run, fingerprint the sources (uncached)."""

from typing import NamedTuple

from kfp import dsl

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_inputs(
    source_uri: str,
    source_layout: str,
    detection_source_uri: str,
    segmentation_source_uri: str,
    output_uri: str,
    run_name: str,
    method: str,
    pretrain_config: str,
    arch: str,
    epochs: int,
    batch_size: int,
    nodes: int,
    gpus_per_node: int,
    sync_bn_scope: str,
    image: str,
    namespace: str,
    s3_secret: str,
    queue_name: str,
    scheduler: str,
    priority_class: str,
    probe_preset: str,
    detection_preset: str,
    segmentation_preset: str,
    compare_runs: list,
    shard_size: int,
    max_side: int,
    prepare_workers: int,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    pretrain_deadline_hours: float,
    launch_backend: str,
    job_name: str,
) -> NamedTuple(  # inline: KFP reads the output names and types from it
    "RunPlan",
    [
        ("run_name", str),
        ("run_uri", str),
        ("launch", str),
        ("pretrain_dest", str),
        ("pretrain_fingerprint", str),
        ("detection_dest", str),
        ("detection_fingerprint", str),
        ("segmentation_dest", str),
        ("segmentation_fingerprint", str),
    ],
):
    """Checks every parameter (all problems at once) and fingerprints the source listings."""
    # First, while the parameters are all there is: each but job_name is a PipelineInputs field.
    parameters = {name: value for name, value in locals().items() if name != "job_name"}
    from ladder_siam.kube.inputs import PipelineInputs
    from ladder_siam.kube.steps import check_inputs as check

    plan = check(PipelineInputs(**parameters), job_name)
    datasets = plan.datasets
    return (
        plan.run_name,
        plan.run_uri,
        plan.launch,
        datasets["pretrain"].dest,
        datasets["pretrain"].fingerprint,
        datasets["detection"].dest,
        datasets["detection"].fingerprint,
        datasets["segmentation"].dest,
        datasets["segmentation"].fingerprint,
    )
