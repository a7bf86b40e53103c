"""The run's arms: one pretraining per method and seed, for the pipeline's loop."""

from kfp import dsl

from ladder_siam.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_arms(launch: str, run_uri: str, methods: list, seeds: list) -> list:
    """Every (method, seed) arm with its own folder, job name and launch settings."""
    from ladder_siam.kube.steps import plan_arms as plan

    return plan(launch, run_uri, methods, seeds)
