"""Shard one source dataset into webdataset tars with manifests (cached per fingerprint).

A big source is prepared by several ``prepare_shards_part`` tasks at once, each writing part
I of N of the shards (``plan_parts`` lists them); ``prepare_shards`` then reuses their shards
and commits the manifests.
"""

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


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_shards_part(
    source: str,
    layout: str,
    dest: str,
    fingerprint: str,
    shard_size: int,
    max_side: int,
    workers: int,
    part: str,
) -> None:
    """Writes part ``part`` (I/N) of the shards to ``dest``; no manifest."""
    from ladder_siam.kube.steps import prepare_dataset_part

    prepare_dataset_part(source, layout, dest, fingerprint, shard_size, max_side, workers, part)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_parts(count: int, dest: str, fingerprint: str) -> list:
    """The part tasks (part ``I/N``, dest, fingerprint) of a source; none for one."""
    from ladder_siam.kube.steps import plan_parts as parts

    return parts(count, dest, fingerprint)
