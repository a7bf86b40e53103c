"""The Kubeflow pipeline of ladder-siam, the top layer.

The DAG (:mod:`.ladder_siam`), its compiled YAML (``ladder_siam.yaml``) and the
``ladder-siam pipeline`` command that compiles, runs locally, submits and schedules it
(:mod:`.runs`). It imports the components, which call :mod:`ladder_siam.kube.steps`.
"""
