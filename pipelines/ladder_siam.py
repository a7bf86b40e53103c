"""The ladder-siam pipeline: shards once -> one arm per method x seed -> one report.

```
check_inputs (uncached: validates every arm, fingerprints the sources)
   ├─► prepare_shards ×3 (pretraining, COCO, VOC; cached while their fingerprint holds;
   │     with data_prepare_parts > 1, that many part tasks per source first, in parallel)
   ├─► plan_arms (the methods x seeds)
   ▼
ParallelFor arm (at most MAX_PARALLEL_ARMS at once):
   pretrain (a light launcher pod; the PyTorchJob's or TrainJob's pods hold the GPUs)
      ├─► linear_probe (one GPU)
      ├─► detection (a launcher too: a job on eval_detection_gpus GPUs)
      └─► segmentation (likewise, on eval_segmentation_gpus)
   ▼ (collected from every arm)
report (per method: mean ± s.e.; per other method: the paired difference, its 95 % interval
        and a verdict)
record_status (exit handler: runs whatever happened)
```

Every step reads S3 credentials from the ``ladder-siam-s3`` Secret when it exists (without
it, the steps use the cloud identity of the pipeline's service account) and
``PUSHGATEWAY_URL`` from the optional ``ladder-siam-settings`` ConfigMap (both in
``k8s/base``). GPU steps get a node selector and tolerations from the parameters (A100 nodes
by default) and a memory-backed ``/dev/shm`` for their data loaders. Steps whose rerun is
harmless (they resume or overwrite atomically) are retried with backoff.

The parameters are named by group (``data_``, ``pretrain_``, ``eval_``, ``cluster_``,
``report_``) because KFP's run form lists them alphabetically.
"""

from kfp import dsl, kubernetes

from ladder_siam.components.check_inputs import check_inputs
from ladder_siam.components.detection import finetune_detection
from ladder_siam.components.linear_probe import linear_probe
from ladder_siam.components.plan_arms import plan_arms
from ladder_siam.components.prepare_shards import (
    plan_parts,
    prepare_shards,
    prepare_shards_part,
)
from ladder_siam.components.pretrain import pretrain
from ladder_siam.components.record_status import record_status
from ladder_siam.components.report import report
from ladder_siam.components.segmentation import finetune_segmentation
from ladder_siam.io.s3 import CREDENTIAL_VARIABLES
from ladder_siam.kube.inputs import PipelineInputs

PIPELINE_NAME = "ladder-siam"
# The steps' credentials; optional, so that a cluster with cloud identities needs none.
STEPS_S3_SECRET = "ladder-siam-s3"
SETTINGS_CONFIG_MAP = "ladder-siam-settings"
# The parameters' defaults: the library's own (names, types and defaults live there).
DEFAULTS = PipelineInputs()
# A rerun of these steps is harmless: they resume, or rewrite their outputs atomically.
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}
# Arms training at once. KFP fixes a loop's parallelism when the pipeline is compiled (it is
# not a run parameter); GPU quota at run time is Kueue's job (cluster_queue_name): an arm's
# training job waits in the queue, its wait shown by the launcher, until quota frees up.
MAX_PARALLEL_ARMS = 4


def _with_environment(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 credentials (if the Secret exists), the Pushgateway address (if set), the namespace."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=STEPS_S3_SECRET,
        secret_key_to_env={key: key for key in CREDENTIAL_VARIABLES},
        optional=True,
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=SETTINGS_CONFIG_MAP,
        config_map_key_to_env={"PUSHGATEWAY_URL": "PUSHGATEWAY_URL"},
        optional=True,
    )
    # Pushed metrics are grouped by namespace, so that tenants never overwrite each other's.
    kubernetes.use_field_path_as_env(task, "POD_NAMESPACE", "metadata.namespace")
    return task


def _on_gpu(task: dsl.PipelineTask, node_selector: dict, tolerations: list) -> dsl.PipelineTask:
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    task.set_cpu_request("8").set_memory_request("64Gi").set_memory_limit("64Gi")
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    _with_shm(task, "16Gi")
    return task


def _launcher(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A step that only submits a training job and follows it: the job's pods hold the GPUs."""
    return task.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi")


def _preparing(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A shard-preparation task: cached per fingerprint, retried, 8 CPUs for its workers."""
    task.set_caching_options(True).set_retry(**RETRIES)
    task.set_cpu_request("8").set_memory_request("32Gi").set_memory_limit("32Gi")
    return _with_environment(task)


def _with_shm(task: dsl.PipelineTask, size: str) -> dsl.PipelineTask:
    # Data-loader workers hand batches over in shared memory; a pod's default /dev/shm is 64 MiB.
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=size
    )
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Ladder Siamese Network pretraining of a ResNet (BYOL with losses on every "
    "stage) on webdataset shards, then linear-probe, detection and segmentation evaluations "
    "and a report.",
)
def ladder_siam_pipeline(
    data_source_uri: str = DEFAULTS.data_source_uri,
    data_source_layout: str = DEFAULTS.data_source_layout,
    data_detection_uri: str = DEFAULTS.data_detection_uri,
    data_segmentation_uri: str = DEFAULTS.data_segmentation_uri,
    data_output_uri: str = DEFAULTS.data_output_uri,
    data_shard_size: int = DEFAULTS.data_shard_size,
    data_max_side: int = DEFAULTS.data_max_side,
    data_prepare_workers: int = DEFAULTS.data_prepare_workers,
    data_prepare_parts: int = DEFAULTS.data_prepare_parts,
    pretrain_run_name: str = DEFAULTS.pretrain_run_name,
    pretrain_methods: list = DEFAULTS.pretrain_methods,
    pretrain_seeds: list = DEFAULTS.pretrain_seeds,
    pretrain_config: str = DEFAULTS.pretrain_config,
    pretrain_arch: str = DEFAULTS.pretrain_arch,
    pretrain_epochs: int = DEFAULTS.pretrain_epochs,
    pretrain_batch_size: int = DEFAULTS.pretrain_batch_size,
    pretrain_nodes: int = DEFAULTS.pretrain_nodes,
    pretrain_gpus_per_node: int = DEFAULTS.pretrain_gpus_per_node,
    pretrain_sync_bn_scope: str = DEFAULTS.pretrain_sync_bn_scope,
    pretrain_deadline_hours: float = DEFAULTS.pretrain_deadline_hours,
    eval_probe_preset: str = DEFAULTS.eval_probe_preset,
    eval_detection_preset: str = DEFAULTS.eval_detection_preset,
    eval_segmentation_preset: str = DEFAULTS.eval_segmentation_preset,
    eval_detection_gpus: int = DEFAULTS.eval_detection_gpus,
    eval_segmentation_gpus: int = DEFAULTS.eval_segmentation_gpus,
    cluster_launch_backend: str = DEFAULTS.cluster_launch_backend,
    cluster_image: str = DEFAULTS.cluster_image,
    cluster_namespace: str = DEFAULTS.cluster_namespace,
    cluster_s3_secret: str = DEFAULTS.cluster_s3_secret,
    cluster_service_account: str = DEFAULTS.cluster_service_account,
    cluster_queue_name: str = DEFAULTS.cluster_queue_name,
    cluster_scheduler: str = DEFAULTS.cluster_scheduler,
    cluster_priority_class: str = DEFAULTS.cluster_priority_class,
    cluster_pending_timeout_minutes: float = DEFAULTS.cluster_pending_timeout_minutes,
    cluster_gpu_node_selector: dict = DEFAULTS.cluster_gpu_node_selector,
    cluster_gpu_tolerations: list = DEFAULTS.cluster_gpu_tolerations,
    report_compare_runs: list = DEFAULTS.report_compare_runs,
) -> None:
    """Pretrains every method with every seed on the same shards, evaluates each, compares.

    Args:
        data_source_uri: Pretraining images, s3://bucket/prefix (an imagefolder with train/
            and val/: its labels serve the linear probe).
        data_source_layout: Layout of data_source_uri: imagefolder, coco, voc or flat.
        data_detection_uri: COCO-layout dataset for the detection finetune.
        data_segmentation_uri: VOC-layout dataset for the segmentation finetune.
        data_output_uri: Where datasets/ and runs/<run name>/ are written.
        data_shard_size: Images per shard.
        data_max_side: Down-scale larger images to this side when sharding; 0 keeps sizes.
        data_prepare_workers: Processes that decode and write shards, per task.
        data_prepare_parts: Tasks (pods) that prepare each source at once, each writing an
            equal share of its shards, before one more task commits the manifests; 1 prepares
            it in one task. The shards are the same either way.
        pretrain_run_name: Names the run's folder and jobs; empty: the KFP run's name.
        pretrain_methods: Methods to compare, the baseline first, e.g. ["byol",
            "ladder-byol"]: byol, ladder-byol, dense-byol, ladder-dense-byol or level strings
            (GGGG). Each is trained once per seed.
        pretrain_seeds: Seeds, e.g. [0, 1, 2]; the same seed pairs two methods. Two or more
            give a 95 % interval over seeds; one seed has only the test set's sampling error.
        pretrain_config: Pretraining preset: a name shipped with the package (the paper's
            recipes, e.g. ladder-byol_r50_in1k_200ep; tiny_cpu), or a YAML file's path or URI;
            the pretrain_ parameters override it.
        pretrain_arch: resnet18, resnet34, resnet50 or resnet101.
        pretrain_epochs: Pretraining epochs.
        pretrain_batch_size: Global batch over all GPUs; must divide by nodes x GPUs per node.
        pretrain_nodes: Pods of the training job, one per node.
        pretrain_gpus_per_node: GPUs and training processes per pod.
        pretrain_sync_bn_scope: GPUs that share BatchNorm statistics when the preset syncs
            them: all (BYOL's) or node (each pod's; cheaper across nodes, see BENCHMARKS.md);
            empty: the preset's.
        pretrain_deadline_hours: Wall-clock limit of the training job; 0: none.
        eval_probe_preset: Linear-probe protocol: paper or tiny.
        eval_detection_preset: Detection schedule: coco-1x, tiny (CPU demo) or smoke (4
            iterations: checks the steps run; its scores mean nothing).
        eval_segmentation_preset: Segmentation schedule: voc, cityscapes, tiny or smoke.
        eval_detection_gpus: GPUs of each detection finetune, a training job of its own (on
            pretraining's nodes and queue); the preset's batch of 16 divides over them.
            coco-1x takes about two days on 1 GPU and about 9 hours on 8 (README).
        eval_segmentation_gpus: GPUs of each segmentation finetune, as for detection.
        cluster_launch_backend: pytorchjob (training operator), trainjob (Kubeflow Trainer
            v2, runtime from k8s/trainer), or local (torchrun; for kfp.local runs).
        cluster_image: Image of the training pods (the steps' image is fixed at compile time).
        cluster_namespace: Namespace of the training job; empty: the pipeline's own.
        cluster_s3_secret: Secret with the AWS_* keys for the training pods; empty: none, the
            pods use the cloud identity of cluster_service_account (IRSA, Workload Identity).
        cluster_service_account: ServiceAccount of the training pods; empty: the namespace's
            default.
        cluster_queue_name: Kueue LocalQueue of the training job (and the gang scheduler's
            queue); empty: none.
        cluster_scheduler: default, or a gang scheduler that starts all pods together or
            none: volcano or scheduler-plugins (a 4x8-GPU job never holds half its GPUs).
        cluster_priority_class: PriorityClass of the training pods; empty: the namespace's.
        cluster_pending_timeout_minutes: Minutes the training job may wait for its pods to
            run (GPUs, image, quota) before it is deleted and the step fails saying why; 0:
            no limit.
        cluster_gpu_node_selector: Node labels the GPU pods require (A100 nodes by default).
        cluster_gpu_tolerations: Tolerations of the GPU pods (tainted GPU nodes).
        report_compare_runs: Earlier runs' folders (a run's, or one arm's) listed before this
            run's arms in the report; the first method is the baseline.
    """
    parameters = dict(locals())  # all of them, for check-inputs (first: nothing else is local)
    status = record_status(
        output_uri=data_output_uri,
        run_name=pretrain_run_name,
        job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )
    _with_environment(status)
    with dsl.ExitHandler(status, name="ladder-siam-run"):
        plan = check_inputs(**parameters, job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        # New data must be seen: the fingerprint is computed afresh on every run.
        plan.set_caching_options(False).set_display_name("check-inputs")
        _with_environment(plan)

        datasets = {}
        for name, source, layout in (
            ("pretrain", data_source_uri, data_source_layout),
            ("detection", data_detection_uri, "coco"),
            ("segmentation", data_segmentation_uri, "voc"),
        ):
            shards = {
                "source": source,
                "layout": layout,
                "shard_size": data_shard_size,
                "max_side": data_max_side,
                "workers": data_prepare_workers,
            }
            dest, fingerprint = plan.outputs[f"{name}_dest"], plan.outputs[f"{name}_fingerprint"]
            parts = plan_parts(count=data_prepare_parts, dest=dest, fingerprint=fingerprint)
            parts.set_display_name(f"plan-{name}-parts")
            parts.set_cpu_request("100m").set_memory_request("256Mi").set_memory_limit("512Mi")
            # No iteration with one part: the committing task below then writes everything.
            with dsl.ParallelFor(_with_environment(parts).output, name=f"{name}-parts") as part:
                piece = _preparing(
                    prepare_shards_part(
                        **shards, dest=part.dest, fingerprint=part.fingerprint, part=part.part
                    )
                )
                piece.set_display_name(f"prepare-{name}-part")
            task = _preparing(prepare_shards(**shards, dest=dest, fingerprint=fingerprint))
            task.after(piece)
            datasets[name] = task.set_display_name(f"prepare-{name}-shards")

        arms = plan_arms(
            launch=plan.outputs["launch"],
            run_uri=plan.outputs["run_uri"],
            methods=pretrain_methods,
            seeds=pretrain_seeds,
        )
        arms.set_display_name("plan-arms")
        arms.set_cpu_request("100m").set_memory_request("256Mi").set_memory_limit("512Mi")
        _with_environment(arms)

        with dsl.ParallelFor(arms.output, parallelism=MAX_PARALLEL_ARMS, name="arms") as arm:
            # A retried launcher adopts only its own arm's job (named after the run and arm,
            # labelled with this KFP run's id).
            training = pretrain(
                dataset=datasets["pretrain"].outputs["dataset"],
                launch=arm.launch,
                backend=cluster_launch_backend,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )
            training.set_display_name("pretrain").set_retry(**RETRIES)
            _with_environment(_launcher(training))

            backbone = training.outputs["model"]
            probe = linear_probe(
                model=backbone, dataset=datasets["pretrain"].outputs["dataset"],
                preset=eval_probe_preset,
            )  # fmt: skip
            probe.set_display_name("linear-probe").set_retry(**RETRIES)
            _on_gpu(probe, cluster_gpu_node_selector, cluster_gpu_tolerations)
            evaluations = {"linear-probe": _with_environment(probe)}
            # Launchers like pretraining: each finetune is a training job of the arm's.
            for name, component, preset, gpus in (
                ("detection", finetune_detection, eval_detection_preset, eval_detection_gpus),
                ("segmentation", finetune_segmentation, eval_segmentation_preset,
                 eval_segmentation_gpus),
            ):  # fmt: skip
                task = component(
                    model=backbone, dataset=datasets[name].outputs["dataset"], preset=preset,
                    gpus=gpus, launch=arm.launch, backend=cluster_launch_backend,
                    kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                )  # fmt: skip
                task.set_display_name(name).set_retry(**RETRIES)
                evaluations[name] = _with_environment(_launcher(task))

        summary = report(
            models=dsl.Collected(backbone),
            dataset=datasets["pretrain"].outputs["dataset"],
            methods=pretrain_methods,
            compare_runs=report_compare_runs,
            run_uri=plan.outputs["run_uri"],
            linear_probe_metrics=dsl.Collected(evaluations["linear-probe"].outputs["metrics"]),
            detection_metrics=dsl.Collected(evaluations["detection"].outputs["metrics"]),
            segmentation_metrics=dsl.Collected(evaluations["segmentation"].outputs["metrics"]),
        )
        summary.set_display_name("report").set_retry(**RETRIES)
        summary.set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("8Gi")
        _with_shm(summary, "2Gi")
        _with_environment(summary)
