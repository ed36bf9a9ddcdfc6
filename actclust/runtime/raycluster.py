"""Start or join a Ray cluster, and size actors to the cores they are given."""

from __future__ import annotations

import logging
import os

from actclust.console import hold_back_worker_lines, worker_runtime_env
from actclust.runtime.actors import in_run_lived

log = logging.getLogger(__name__)

# Ray starts worker processes at niceness 15: beside a normal-priority busy process a
# worker gets about 1/30 of the core (scheduler weights 36 vs 1024), and on a shared
# machine the actors' start-up alone took minutes. The actors do the job's work: run
# them at the driver's priority, as Ray's own job drivers are (a per-actor setting,
# so it also holds on a cluster the job joins and inside a Tune trial).
WORK_PRIORITY = {"env_vars": {"RAY_worker_niceness": "0"}}
# The share of its resources a run-lived actor reserves (three stage kinds live together).
RUN_LIVED_SHARE = 1 / 3


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set (a cluster from ``ray start`` or a job
    submission), else start a private local instance on this machine."""
    import ray

    if ray.is_initialized():
        return
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True,
                 runtime_env=worker_runtime_env())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        # "local": never attach to a cluster that `ray start` left on this machine
        # unless asked to through RAY_ADDRESS.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 **quiet)
    hold_back_worker_lines()


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def actor_options(workers: int, *, use_gpu: bool | None = None) -> dict:
    """Options for one of ``workers`` actors: a GPU each on a GPU cluster, else an
    equal share of the cluster's CPUs (threads are set to match); normal priority.

    Inside :func:`actclust.runtime.actors.run_lived_actors` the stage groups of a run are
    alive together though only one stage works at a time, so each reserves a third of its
    share (the evaluation actors, the k-means workers and the baseline worker fit beside
    each other); its threads stay those of the whole share (:func:`actor_threads`).
    """
    options = _resources(workers, use_gpu=use_gpu)
    if not in_run_lived():
        return {**options, "runtime_env": WORK_PRIORITY}
    options = {key: value * RUN_LIVED_SHARE for key, value in options.items()}
    if not _in_placement_group():
        # A smaller reservation would let Ray pack the actors onto fewer nodes than their
        # whole shares fill: spread them as the whole shares would.
        options["scheduling_strategy"] = "SPREAD"
    return {**options, "runtime_env": WORK_PRIORITY}


def _in_placement_group() -> bool:
    from ray.util import get_current_placement_group

    return get_current_placement_group() is not None


def actor_threads(workers: int, *, use_gpu: bool | None = None) -> int:
    """Threads of one of ``workers`` actors: its whole CPU share."""
    return max(1, int(_resources(workers, use_gpu=use_gpu)["num_cpus"]))


def _resources(workers: int, *, use_gpu: bool | None) -> dict:
    import ray
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is not None:  # inside a Tune trial: take the trial's worker bundles
        bundles = group.bundle_specs[1:] or group.bundle_specs
        bundle = bundles[0]
        options = {"num_cpus": bundle.get("CPU", 0)}
        if bundle.get("GPU"):
            options["num_gpus"] = bundle["GPU"]
        return options
    if use_gpu is None:
        use_gpu = cluster_gpus() > 0
    if use_gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return {"num_cpus": max(1, cpus // max(1, workers))}


def set_threads(num_cpus: float) -> int:
    """Size torch's thread pool to this actor's CPU share (no oversubscription)."""
    import torch

    threads = max(1, int(num_cpus))
    torch.set_num_threads(threads)
    return threads
