"""The exit handler: how the run ended, whatever happened."""

from kfp import dsl

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def record_status(
    status: dsl.PipelineTaskFinalStatus, output_uri: str, run_name: str, job_name: str
) -> None:
    """Writes <run>/pipeline_status.json and pushes the outcome to the Pushgateway."""
    from ladder_siam.kube.steps import record_status as record

    record(output_uri, run_name, job_name, status.state, status.error_message or "")
