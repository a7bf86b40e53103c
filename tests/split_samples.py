"""Every raw sample of a prepared split, in manifest order, for tests that inspect shards."""

from __future__ import annotations

from ladder_siam.data.manifest import load_split
from ladder_siam.data.tar_shards import Sample, iter_samples
from ladder_siam.io import storage


def split_samples(split_uri: str) -> list[Sample]:
    """The samples of the split at ``split_uri`` (a split folder, or a dataset's train split)."""
    samples: list[Sample] = []
    for uri in load_split(split_uri).shard_uris():
        with storage.open_read(uri) as stream:
            samples.extend(iter_samples(stream))
    return samples
