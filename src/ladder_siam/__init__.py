"""ladder-siam: Ladder Siamese Network self-supervised pretraining as a Kubeflow pipeline.

Importing the package stays cheap (no torch): shard preparation runs in worker processes that
never need it.
"""

__version__ = "0.1.0"
