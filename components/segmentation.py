"""Segmentation evaluation of the pretrained backbone."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune_segmentation(
    model: Input[Model],
    dataset: Input[Dataset],
    preset: str,
    gpus: int,
    launch: str,
    backend: str,
    kfp_run_id: str,
    metrics: Output[Metrics],
) -> None:
    """FCN-D8 finetune on VOC-layout shards; mIoU and pixel accuracy into the metrics.

    A launcher: the finetune runs as a training job of the arm on ``gpus`` GPUs.
    """
    from ladder_siam.kube.steps import run_evaluation

    run_evaluation(
        "segmentation", model, dataset, preset, gpus, launch, backend, kfp_run_id, metrics
    )
