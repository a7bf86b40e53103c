"""ladder-siam: Ladder Siamese Network self-supervised pretraining as a Kubeflow pipeline.

Importing the package stays cheap (no torch): shard preparation runs in worker processes that
never need it.
"""

__version__ = "0.1.0"

# The project image (images/ladder-siam) every pipeline step and PyTorchJob pod runs. Push it
# to your registry and compile with `ladder-siam pipeline compile --image REGISTRY/...:TAG`.
IMAGE = f"registry.example.com/ladder-siam:{__version__}"
