"""The first step: validate the parameters, name the run, fingerprint the sources (uncached)."""

from typing import NamedTuple

from kfp import dsl

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_inputs(
    data_source_uri: str,
    data_source_layout: str,
    data_detection_uri: str,
    data_segmentation_uri: str,
    data_output_uri: str,
    data_shard_size: int,
    data_max_side: int,
    data_prepare_workers: int,
    data_prepare_parts: int,
    pretrain_run_name: str,
    pretrain_methods: list,
    pretrain_seeds: list,
    pretrain_config: str,
    pretrain_arch: str,
    pretrain_epochs: int,
    pretrain_batch_size: int,
    pretrain_nodes: int,
    pretrain_gpus_per_node: int,
    pretrain_sync_bn_scope: str,
    pretrain_deadline_hours: float,
    eval_probe_preset: str,
    eval_detection_preset: str,
    eval_segmentation_preset: str,
    eval_detection_gpus: int,
    eval_segmentation_gpus: int,
    cluster_launch_backend: str,
    cluster_image: str,
    cluster_namespace: str,
    cluster_s3_secret: str,
    cluster_service_account: str,
    cluster_queue_name: str,
    cluster_scheduler: str,
    cluster_priority_class: str,
    cluster_pending_timeout_minutes: float,
    cluster_gpu_node_selector: dict,
    cluster_gpu_tolerations: list,
    report_compare_runs: list,
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
