"""Detection: Mask R-CNN with FPN on the backbone, finetuned and scored on COCO.

:mod:`.config` (detectron2's 1x recipe and presets), :mod:`.data` (targets from shards),
:mod:`.model`, :mod:`.finetune` (the step) and :mod:`.coco_eval` (box and mask AP).
"""
