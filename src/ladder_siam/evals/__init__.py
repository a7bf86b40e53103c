"""The evaluations of an exported backbone, one subpackage each.

:mod:`.probe` (per-stage linear probe and kNN, Table 7), :mod:`.detection` (Mask R-CNN with
FPN, COCO AP) and :mod:`.segmentation` (FCN-D8, mIoU). Each has a config, its data
transforms, its model, the training loop and its scoring, and writes ``metrics.json``.
"""
