"""Pretraining: a light launcher pod that runs a PyTorchJob or TrainJob (torchrun in local runs)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(
    dataset: Input[Dataset],
    launch: str,
    backend: str,
    kfp_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> None:
    """Submits the training job, streams its rank-0 log and waits; deletes it if cancelled."""
    from ladder_siam.kube.steps import pretrain as run_pretraining

    run_pretraining(dataset, launch, backend, kfp_run_id, model, metrics)
