"""Kubeflow and Kubernetes: the pipeline's steps and the training job.

:mod:`.inputs` validates the pipeline's parameters and plans a run; :mod:`.steps` holds the
one library call behind each KFP component. :mod:`.launch_config` describes a run's job,
:mod:`.pod` hardens its pods, :mod:`.pytorchjob` and :mod:`.trainjob` build it as either kind,
:mod:`.launch` submits, follows and adopts it (:mod:`.waiting` says why it waits), and
:mod:`.render` prints it for review. Compiling, running and scheduling the pipeline itself is
:mod:`ladder_siam.pipelines.runs`, above the components it is made of.
"""
