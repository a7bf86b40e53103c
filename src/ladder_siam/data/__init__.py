"""Data on disk and in flight: shards, manifests, streaming and decoding.

The webdataset tar format (:mod:`.tar_shards`) and the manifests that commit a dataset
(:mod:`.manifest`); the training loader that streams shards to ranks and workers with exact
resume (:mod:`.shards`) and the exactly-once reader evaluations use (:mod:`.splits`); JPEG
decoding at reduced size with BYOL's crops (:mod:`.crops`, :mod:`.gpu_decode`) and the
batched photometric ops that run on the device (:mod:`.photometric`). It builds on
:mod:`ladder_siam.io` only.
"""
