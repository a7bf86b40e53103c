"""The Kubeflow pipeline of ladder-siam and its compiled YAML (``ladder_siam.yaml``)."""
