"""Segmentation: FCN-D8 on the dilated backbone, finetuned and scored by mIoU.

:mod:`.config` (mmseg's recipes for VOC and Cityscapes), :mod:`.data` (crops and masks),
:mod:`.model`, :mod:`.finetune` (the step), :mod:`.scoring` (sliding-window evaluation) and
:mod:`.miou`.
"""
