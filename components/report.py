"""The report comparing this run with earlier ones."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(
    model: Input[Model],
    dataset: Input[Dataset],
    compare_runs: list,
    linear_probe_metrics: Input[Metrics],
    detection_metrics: Input[Metrics],
    segmentation_metrics: Input[Metrics],
    metrics: Output[Metrics],
    markdown: Output[Markdown],
    html: Output[HTML],
) -> None:
    """Writes <run>/report and the HTML/Markdown the UI shows (after all three evaluations)."""
    from ladder_siam.kube.steps import write_report

    write_report(model, dataset, compare_runs, metrics, markdown, html)
