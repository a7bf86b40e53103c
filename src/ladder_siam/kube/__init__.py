"""Kubeflow and Kubernetes: the pipeline's steps and the training job.

:mod:`.inputs` validates the pipeline's parameters and plans a run; :mod:`.steps` holds the
one library call behind each KFP component; :mod:`.pytorchjob` builds the PyTorchJob and
:mod:`.launch` submits and follows it. Compiling, running and scheduling the pipeline itself
is :mod:`ladder_siam.pipelines.runs`, above the components it is made of.
"""
