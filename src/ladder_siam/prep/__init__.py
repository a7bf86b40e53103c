"""Preparing datasets: sources in four layouts, turned into webdataset shards.

:mod:`.sources` lists an imagefolder, COCO, VOC or flat source through its layout's reader
(:mod:`.folders`, :mod:`.coco`, :mod:`.voc`, reading files with :mod:`.annotation_files`),
which validates every record into a :mod:`.listing`; :mod:`.images` validates and normalises
each image; :mod:`.samples` encodes samples with their labels; :mod:`.prepare_shards` is the
``prepare-shards`` step (deterministic, resumable, every skip listed, a failed read failing
the step) and :mod:`.accounting` what it reports. :mod:`.demo_data`, :mod:`.scenes` and
:mod:`.fashion_mnist` make the built-in data.
"""
