"""Linear-probe evaluation of the pretrained backbone, per stage."""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def linear_probe(
    model: Input[Model],
    dataset: Input[Dataset],
    preset: str,
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
) -> None:
    """Linear probe and kNN on every stage (Table 7); the top stage's confusion matrix."""
    from ladder_siam.kube.steps import linear_probe as evaluate

    evaluate(model, dataset, preset, metrics, classification)
