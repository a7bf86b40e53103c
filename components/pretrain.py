"""Pretraining: a light launcher pod that runs a PyTorchJob (or torchrun in local runs)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(
    dataset: Input[Dataset],
    launch: str,
    backend: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> None:
    """Submits the PyTorchJob, streams its master's log and waits; deletes it if cancelled."""
    from ladder_siam.kube.steps import pretrain as run_pretraining

    run_pretraining(dataset, launch, backend, model, metrics)
