"""The ladder-siam pipeline: shards -> pretraining -> three evaluations in parallel -> report.

```
check_inputs (uncached: validates, fingerprints the sources)
   ├─► prepare_shards ×3 (pretraining, COCO, VOC; cached while their fingerprint holds)
   ▼
pretrain (a light launcher pod; the PyTorchJob's pods hold the GPUs)
   ├─► linear_probe ─┐
   ├─► detection ────┼─► report
   └─► segmentation ─┘
record_status (exit handler: runs whatever happened)
```

Every step reads S3 credentials from the ``ladder-siam-s3`` Secret and ``PUSHGATEWAY_URL``
from the optional ``ladder-siam-settings`` ConfigMap (both in ``k8s/base``). GPU steps get a
node selector and tolerations from the parameters (A100 nodes by default) and a memory-backed
``/dev/shm`` for their data loaders.
"""

from kfp import dsl, kubernetes

from ladder_siam.components.check_inputs import check_inputs
from ladder_siam.components.detection import finetune_detection
from ladder_siam.components.linear_probe import linear_probe
from ladder_siam.components.prepare_shards import prepare_shards
from ladder_siam.components.pretrain import pretrain
from ladder_siam.components.record_status import record_status
from ladder_siam.components.report import report
from ladder_siam.components.segmentation import finetune_segmentation
from ladder_siam.kube.inputs import PipelineInputs

PIPELINE_NAME = "ladder-siam"
S3_SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
SETTINGS_CONFIG_MAP = "ladder-siam-settings"
# The parameters' defaults: the library's own (names, types and defaults live there).
DEFAULTS = PipelineInputs()


def _with_environment(task: dsl.PipelineTask, s3_secret: str) -> dsl.PipelineTask:
    """S3 credentials from the Secret; the Pushgateway address from the settings, if any."""
    kubernetes.use_secret_as_env(
        task, secret_name=s3_secret, secret_key_to_env={key: key for key in S3_SECRET_KEYS}
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=SETTINGS_CONFIG_MAP,
        config_map_key_to_env={"PUSHGATEWAY_URL": "PUSHGATEWAY_URL"},
        optional=True,
    )
    return task


def _on_gpu(task: dsl.PipelineTask, node_selector: dict, tolerations: list) -> dsl.PipelineTask:
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    task.set_cpu_request("8").set_memory_request("64Gi").set_memory_limit("64Gi")
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    _with_shm(task, "16Gi")
    return task


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
    source_uri: str = DEFAULTS.source_uri,
    source_layout: str = DEFAULTS.source_layout,
    detection_source_uri: str = DEFAULTS.detection_source_uri,
    segmentation_source_uri: str = DEFAULTS.segmentation_source_uri,
    output_uri: str = DEFAULTS.output_uri,
    run_name: str = DEFAULTS.run_name,
    method: str = DEFAULTS.method,
    pretrain_config: str = DEFAULTS.pretrain_config,
    arch: str = DEFAULTS.arch,
    epochs: int = DEFAULTS.epochs,
    batch_size: int = DEFAULTS.batch_size,
    nodes: int = DEFAULTS.nodes,
    gpus_per_node: int = DEFAULTS.gpus_per_node,
    sync_bn_scope: str = DEFAULTS.sync_bn_scope,
    image: str = DEFAULTS.image,
    namespace: str = DEFAULTS.namespace,
    s3_secret: str = DEFAULTS.s3_secret,
    queue_name: str = DEFAULTS.queue_name,
    scheduler: str = DEFAULTS.scheduler,
    priority_class: str = DEFAULTS.priority_class,
    probe_preset: str = DEFAULTS.probe_preset,
    detection_preset: str = DEFAULTS.detection_preset,
    segmentation_preset: str = DEFAULTS.segmentation_preset,
    compare_runs: list = DEFAULTS.compare_runs,
    shard_size: int = DEFAULTS.shard_size,
    max_side: int = DEFAULTS.max_side,
    prepare_workers: int = DEFAULTS.prepare_workers,
    gpu_node_selector: dict = DEFAULTS.gpu_node_selector,
    gpu_tolerations: list = DEFAULTS.gpu_tolerations,
    pretrain_deadline_hours: float = DEFAULTS.pretrain_deadline_hours,
    launch_backend: str = DEFAULTS.launch_backend,
) -> None:
    """The whole flow for one pretraining run.

    Args:
        source_uri: Pretraining images (imagefolder with train/ and val/: its labels serve the
            linear probe), s3://bucket/prefix.
        source_layout: Layout of source_uri: imagefolder, coco, voc or flat.
        detection_source_uri: COCO-layout dataset for the detection finetune.
        segmentation_source_uri: VOC-layout dataset for the segmentation finetune.
        output_uri: Where datasets/ and runs/<run_name>/ are written.
        run_name: Names the run's folder and PyTorchJob; empty: the KFP run's name.
        method: byol, ladder-byol, dense-byol, ladder-dense-byol or a level string (GGGG).
        pretrain_config: Preset in the image's configs/ (the paper's recipes); the
            parameters below override it.
        arch: resnet18, resnet34, resnet50 or resnet101.
        epochs: Pretraining epochs.
        batch_size: Global batch over all GPUs; must divide by nodes x gpus_per_node.
        nodes: PyTorchJob pods (one Master, the rest Workers).
        gpus_per_node: GPUs and training processes per pod.
        sync_bn_scope: GPUs that share BatchNorm statistics when the preset syncs them: all
            (BYOL's) or node (each pod's; cheaper across nodes, see BENCHMARKS.md); empty:
            the preset's.
        image: Image of the PyTorchJob's pods (the steps' image is fixed at compile time).
        namespace: Namespace of the PyTorchJob; empty: the pipeline's own namespace.
        s3_secret: Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
            AWS_DEFAULT_REGION.
        queue_name: Kueue LocalQueue for the PyTorchJob (and the gang scheduler's queue);
            empty: none.
        scheduler: default, or a gang scheduler that starts all pods together or none:
            volcano or scheduler-plugins (a 4x8-GPU job never holds half its GPUs waiting).
        priority_class: PriorityClass of the training pods; empty: the namespace default.
        probe_preset: Linear-probe protocol: paper or tiny.
        detection_preset: Detection schedule: coco-1x or tiny.
        segmentation_preset: Segmentation schedule: voc, cityscapes or tiny.
        compare_runs: Earlier runs' folders to compare with in the report; the first is the
            baseline (e.g. a BYOL run).
        shard_size: Images per shard.
        max_side: Down-scale larger images to this side when sharding; 0 keeps sizes.
        prepare_workers: Processes that decode and write shards.
        gpu_node_selector: Node labels the GPU pods require (A100 nodes by default).
        gpu_tolerations: Tolerations of the GPU pods (tainted GPU nodes).
        pretrain_deadline_hours: Wall-clock limit of the PyTorchJob; 0: none.
        launch_backend: kubernetes (a PyTorchJob), or local (torchrun; for kfp.local runs).
    """
    parameters = dict(locals())  # all of them, for check-inputs (first: nothing else is local)
    status = record_status(
        output_uri=output_uri, run_name=run_name, job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    )
    _with_environment(status, s3_secret)
    with dsl.ExitHandler(status, name="ladder-siam-run"):
        plan = check_inputs(**parameters, job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        # New data must be seen: the fingerprint is computed afresh on every run.
        plan.set_caching_options(False).set_display_name("check-inputs")
        _with_environment(plan, s3_secret)

        datasets = {}
        for name, source, layout in (
            ("pretrain", source_uri, source_layout),
            ("detection", detection_source_uri, "coco"),
            ("segmentation", segmentation_source_uri, "voc"),
        ):
            task = prepare_shards(
                source=source,
                layout=layout,
                dest=plan.outputs[f"{name}_dest"],
                fingerprint=plan.outputs[f"{name}_fingerprint"],
                shard_size=shard_size,
                max_side=max_side,
                workers=prepare_workers,
            )
            task.set_caching_options(True).set_display_name(f"prepare-{name}-shards")
            task.set_cpu_request("8").set_memory_request("32Gi").set_memory_limit("32Gi")
            datasets[name] = _with_environment(task, s3_secret)

        training = pretrain(
            dataset=datasets["pretrain"].outputs["dataset"],
            launch=plan.outputs["launch"],
            backend=launch_backend,
        )
        training.set_display_name("pretrain")
        training.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi")
        _with_environment(training, s3_secret)

        backbone = training.outputs["model"]
        evaluations = {}
        for name, component, preset in (
            ("linear-probe", linear_probe, probe_preset),
            ("detection", finetune_detection, detection_preset),
            ("segmentation", finetune_segmentation, segmentation_preset),
        ):
            dataset = datasets["pretrain" if name == "linear-probe" else name]
            task = component(model=backbone, dataset=dataset.outputs["dataset"], preset=preset)
            task.set_display_name(name)
            _on_gpu(task, gpu_node_selector, gpu_tolerations)
            evaluations[name] = _with_environment(task, s3_secret)

        summary = report(
            model=backbone,
            dataset=datasets["pretrain"].outputs["dataset"],
            compare_runs=compare_runs,
            linear_probe_metrics=evaluations["linear-probe"].outputs["metrics"],
            detection_metrics=evaluations["detection"].outputs["metrics"],
            segmentation_metrics=evaluations["segmentation"].outputs["metrics"],
        )
        summary.set_display_name("report")
        summary.set_cpu_request("2").set_memory_request("8Gi").set_memory_limit("8Gi")
        _with_shm(summary, "2Gi")
        _with_environment(summary, s3_secret)
