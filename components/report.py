"""The report comparing the run's arms (and earlier runs): is a difference real?"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(
    models: Input[list[Model]],
    dataset: Input[Dataset],
    methods: list,
    compare_runs: list,
    run_uri: str,
    linear_probe_metrics: Input[list[Metrics]],
    detection_metrics: Input[list[Metrics]],
    segmentation_metrics: Input[list[Metrics]],
    metrics: Output[Metrics],
    markdown: Output[Markdown],
    html: Output[HTML],
) -> None:
    """Writes <run>/report and the HTML/Markdown the UI shows (after every arm's evaluations)."""
    from ladder_siam.kube.steps import write_report

    write_report(models, dataset, methods, compare_runs, run_uri, metrics, markdown, html)
