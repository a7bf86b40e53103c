"""Which samples of a split each (rank, loader worker) *slot* reads.

The training loader (``shards.ShardDataset``, one shuffle round at a time) and the evaluation
reader (``splits.SplitReader``) share this partition, so the two never disagree on which
slot owns a sample. Determinism and bitwise resume depend on it staying exactly as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

Shard = TypeVar("Shard")
Item = TypeVar("Item")


def slot_share(
    shards: Sequence[Shard], slot: int, slots: int, read: Callable[[Shard], Iterable[Item]]
) -> Iterator[Item]:
    """The samples slot ``slot`` of ``slots`` reads; the slots' shares partition the shards'.

    With at least as many shards as slots, shards are dealt out whole (``shards[slot::slots]``),
    so each is streamed by one slot only. With fewer, every slot reads every shard and keeps
    every ``slots``-th sample (counted across shards), so no slot goes without samples.

    Args:
        shards: The shards, in the order to read them.
        slot: This slot's index, ``0 <= slot < slots``.
        slots: The number of slots (ranks x loader workers).
        read: Streams one shard's samples.
    """
    if len(shards) >= slots:
        for shard in shards[slot::slots]:
            yield from read(shard)
        return
    position = 0
    for shard in shards:
        for sample in read(shard):
            if position % slots == slot:
                yield sample
            position += 1
