"""The ResNets a backbone may be and the names of their stages, without importing torch.

Settings are validated against these in steps that never build a network (the pipeline's
first step, the CLI's argument checks), so they live apart from the networks themselves.
"""

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# torchvision's layer1..layer4, by the paper's names.
STAGES = ("res2", "res3", "res4", "res5")
