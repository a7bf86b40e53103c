"""One thin Kubeflow Pipelines component per pipeline step.

Each is a lightweight ``@dsl.component``: KFP ships the function's source into a pod of the
project image, and the body imports ``ladder_siam`` and calls one library function in
``ladder_siam.kube.steps``. The image already holds kfp, so none is installed at run time.
"""

from ladder_siam import IMAGE

__all__ = ["IMAGE"]
