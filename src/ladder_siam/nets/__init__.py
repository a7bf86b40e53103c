"""Backbones: torchvision ResNets split into stages res2..res5, and the exported files.

:mod:`.backbones` builds a ResNet and exposes its stage outputs; :mod:`.backbone_file` reads
an exported ``backbone.pt`` and infers its architecture, refusing a wrong one.
"""
