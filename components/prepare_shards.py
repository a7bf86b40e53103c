"""Shard one source dataset into webdataset tars with manifests (cached per fingerprint)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_shards(
    source: str,
    layout: str,
    dest: str,
    fingerprint: str,
    shard_size: int,
    max_side: int,
    workers: int,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
) -> None:
    """Writes the shards to ``dest``; the Dataset artifact points there (metadata ``uri``)."""
    from ladder_siam.kube.steps import prepare_dataset

    prepare_dataset(
        source, layout, dest, fingerprint, shard_size, max_side, workers, dataset, metrics
    )
