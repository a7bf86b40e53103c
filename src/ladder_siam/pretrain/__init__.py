"""Ladder Siamese pretraining: the method of the paper and its training loop.

:mod:`.losses` (the global and dense BYOL losses, Eq. 3-7), :mod:`.heads` (projectors and
predictors), :mod:`.model` (the online and EMA target networks with a loss at every stage),
:mod:`.augmentation` (BYOL's photometric recipe, batched on the device), :mod:`.config` (the
settings and presets) and :mod:`.train` (the ``pretrain`` step, run by ``torchrun -m
ladder_siam.pretrain``).
"""
