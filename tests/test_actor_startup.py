"""Stage actors on a busy machine: they run at normal priority, and a k-means worker
that starts slowly joins its group instead of being given up."""

from __future__ import annotations

import os
import time

from actclust.runtime.actors import ActorGroup
from actclust.runtime.raycluster import WORK_PRIORITY, actor_options


def remote_probe(ray, **options):
    """An actor class defined here, so Ray ships it by value (workers cannot import
    this test module)."""

    class Probe:
        """Sleeps ``start_s`` in its constructor: a slow start-up, as under load."""

        def __init__(self, start_s: float = 0.0):
            time.sleep(start_s)

        def niceness(self) -> int:
            return os.nice(0)

    return ray.remote(Probe).options(max_restarts=0, **options)


def test_stage_actors_run_at_the_drivers_priority(ray_session):
    ray = ray_session
    plain = remote_probe(ray, num_cpus=1).remote()
    options = actor_options(2, use_gpu=False)
    assert options["num_cpus"] == 1  # two CPUs shared by two actors
    staged = remote_probe(ray, **options).remote()
    # Ray lowers its workers' priority (niceness 15) unless told otherwise: a busy
    # process per core would then leave the stage's actors a few percent of a core.
    assert ray.get(plain.niceness.remote()) > 0
    assert ray.get(staged.niceness.remote()) == 0
    for actor in (plain, staged):
        ray.kill(actor)
    # On a GPU cluster: a GPU each, at the same priority.
    gpu = actor_options(2, use_gpu=True)
    assert (gpu["num_gpus"], gpu["num_cpus"], gpu["runtime_env"]) == (1, 1, WORK_PRIORITY)


def test_a_slowly_starting_worker_is_waited_for(ray_session):
    ray = ray_session
    Worker = remote_probe(ray, num_cpus=1, runtime_env=WORK_PRIORITY)
    starts = iter([3.0, 5.0])  # both placed at once; the second is up 2 s after the first
    group = ActorGroup(lambda: Worker.remote(next(starts)), 2)
    try:
        assert len(group.started(grace_s=0.5)) == 2
    finally:
        group.shutdown()


def test_a_worker_that_cannot_be_placed_is_given_up(ray_session):
    ray = ray_session
    # Two CPUs each on a two-CPU instance: the second can only start once the first
    # is gone, so the group goes on without it.
    Worker = remote_probe(ray, num_cpus=2, runtime_env=WORK_PRIORITY)
    group = ActorGroup(lambda: Worker.remote(1.0), 2)
    started = time.monotonic()
    try:
        assert len(group.started(grace_s=0.5)) == 1
        assert time.monotonic() - started < 120
    finally:
        group.shutdown()


def test_actors_in_a_trials_placement_group_keep_its_bundles_and_priority(ray_session):
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # As a Tune trial: a bundle for the trial itself, one per worker actor.
    group = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(group.ready(), timeout=300)

    def trial():
        import os

        import ray as ray_in_trial

        from actclust.runtime.raycluster import actor_options

        class Probe:
            def niceness(self) -> int:
                return os.nice(0)

        options = actor_options(4)  # the bundle decides, not the worker count
        actor = ray_in_trial.remote(Probe).options(max_restarts=0, **options).remote()
        niceness = ray_in_trial.get(actor.niceness.remote())
        ray_in_trial.kill(actor)
        return options, niceness

    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    try:
        options, niceness = ray.get(ray.remote(trial).options(
            num_cpus=1, scheduling_strategy=strategy).remote(), timeout=300)
    finally:
        remove_placement_group(group)
    assert options["num_cpus"] == 1 and "num_gpus" not in options
    assert options["runtime_env"] == {"env_vars": {"RAY_worker_niceness": "0"}}
    assert niceness == 0
