"""The arms of a run: one pretraining per method and seed, compared in one report.

A run lists methods (the first is the baseline) and seeds; each (method, seed) is an *arm*
with its own folder (``runs/<run>/arms/<method>-s<seed>``), training job, pod labels and
Pushgateway group. The same seed gives two methods the same data order and initialisation,
which is what lets the report pair them (:mod:`ladder_siam.report.comparisons`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ladder_siam.errors import UsageError
from ladder_siam.kube.launch_config import LaunchConfig
from ladder_siam.pretrain.levels import parse_levels
from ladder_siam.runtime.run_folder import RunFolder

# The training operator names Services <job>-worker-<i>, which must stay DNS-1035 labels of at
# most 63 characters: the job name keeps 11 characters for that suffix.
JOB_NAME_CHARS = 52
_HASH_CHARS = 6
# What a Kubernetes name (and so a run's or an arm's) cannot hold.
NOT_NAME = re.compile(r"[^a-z0-9-]+")
JOB_PREFIX = "ladder-siam-"


@dataclass(frozen=True)
class ArmPlan:
    """One arm as the pipeline's loop receives it.

    Attributes:
        name: ``<method>-s<seed>``: the arm's folder and label.
        method: The pretraining method (a name or a level string).
        seed: The pretraining seed.
        launch: The arm's :class:`LaunchConfig` as JSON (a KFP parameter cannot hold None).
    """

    name: str
    method: str
    seed: int
    launch: str


def arm_name(method: str, seed: int) -> str:
    """The arm's folder and label: ``ladder-byol-s0``, or ``gg-g-s1`` for a level string."""
    return f"{NOT_NAME.sub('-', method.lower()).strip('-')}-s{seed}"


def job_name(run: str, arm: str) -> str:
    """The training job's name: ``ladder-siam-<run>-<arm>``, shortened with a hash if long.

    Without an arm (a job launched by hand), ``ladder-siam-<run>``.
    """
    name = f"{JOB_PREFIX}{run}-{arm}" if arm else f"{JOB_PREFIX}{run}"
    if len(name) <= JOB_NAME_CHARS:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    return f"{name[: JOB_NAME_CHARS - _HASH_CHARS - 1].rstrip('-')}-{digest}"


def method_problems(methods: list[str]) -> list[str]:
    """Every problem with a list of methods: empty, unknown or the same method twice."""
    if not methods:
        return ["pretrain_methods: empty; give at least one method, the baseline first"]
    problems, seen = [], {}
    for method in methods:
        try:
            levels = parse_levels(str(method))
        except ValueError as error:
            problems.append(f"pretrain_methods: {error}")
            continue
        if levels in seen:
            problems.append(
                f"pretrain_methods: {seen[levels]!r} and {method!r} are the same method "
                f"({levels}); list each once"
            )
        seen.setdefault(levels, method)
    return problems


def seeds_of(seeds: list[Any]) -> list[int]:
    """The seeds as integers (KFP hands list items over as JSON numbers, maybe ``0.0``).

    Raises:
        ValueError: Empty, a value that is not a non-negative integer, or a repeated seed.
    """
    if not seeds:
        raise UsageError("pretrain_seeds: empty; give at least one seed, e.g. [0]")
    values = []
    for seed in seeds:
        number = isinstance(seed, int | float) and not isinstance(seed, bool)
        if not number or not math.isfinite(seed) or seed != int(seed):
            raise UsageError(f"pretrain_seeds: {seed!r} is not an integer")
        if seed < 0:
            raise UsageError(f"pretrain_seeds: {seed!r}: 0 or more")
        values.append(int(seed))
    if len(set(values)) != len(values):
        raise UsageError(f"pretrain_seeds {values}: each seed once")
    return values


def arm_launch(base: LaunchConfig, run_uri: str, method: str, seed: int) -> LaunchConfig:
    """The launch settings of one arm: the run's, with its method, seed, folder and job."""
    name = arm_name(method, seed)
    pretrain = dataclasses.replace(
        base.pretrain, method=method, seed=seed, out=RunFolder(run_uri).arm(name).uri
    )
    return dataclasses.replace(base, name=job_name(base.run_id, name), arm=name, pretrain=pretrain)


def plan_arms(
    base: LaunchConfig, run_uri: str, methods: list[str], seeds: list[Any]
) -> list[ArmPlan]:
    """Every arm of a run, methods first (in their order) then seeds.

    Raises:
        ValueError: A bad method or seed list (see :func:`method_problems`, :func:`seeds_of`).
    """
    problems = method_problems(methods)
    if problems:
        raise UsageError("; ".join(problems))
    plans = []
    for method in methods:
        for seed in seeds_of(seeds):
            launch = arm_launch(base, run_uri, method, seed)
            config = json.dumps(dataclasses.asdict(launch), sort_keys=True)
            plans.append(ArmPlan(launch.arm, method, seed, config))
    return plans
