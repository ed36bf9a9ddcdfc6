"""One actor lifecycle for every stage: start, replace, hand out work, shut down.

:class:`ActorGroup` starts ``size`` Ray actors from a factory. An actor joins
the group only once its constructor has finished; one whose start fails
(placed on a node that was dying) is replaced, within a budget, and one that
cannot be placed at all (the cluster lost the resources) is simply not waited
for. Actors are created with ``max_restarts=0``: a Ray-level restart that
cannot be placed would leave its task hanging, while the group's own retry
always makes progress. Two ways to use the group:

- a work queue (:meth:`ActorGroup.run`, extraction and evaluation): each task
  goes to an idle actor; when an actor dies its task is put back at the front
  of the queue and a replacement is requested;
- a fixed group (:meth:`ActorGroup.started`, the k-means collective): wait
  for the actors that can be placed, then use them as ranks.

:class:`FaultHooks` are the points where a test injects faults into the actors
(passed in as an object; the library's own hooks do nothing).

Inside :func:`run_lived_actors` (``actclust run`` and each sweep trial) a stage asks
:func:`stage_group` for its group by a key that names what the actors load (the model,
their CPU share): the first call starts it, later stages with the same key reuse it,
and the block's end shuts every group down. Outside the block each call gets a fresh
group, shut down when the call returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Any, Callable, Hashable, Iterable, Iterator

log = logging.getLogger(__name__)


class FaultHooks:
    """Called by the actors at fixed points; a test passes a subclass to inject
    latency or crashes. The default does nothing."""

    def kmeans_iteration(self, rank: int, layer: int, iteration: int) -> None:
        """After each k-means iteration of a clustering worker."""

    def evaluation_chunk(self, chunk: int) -> None:
        """Before an evaluation actor evaluates a chunk of windows."""

    def extraction_shard(self, shard: str) -> None:
        """Before an extraction actor computes a shard."""


class ActorGroup:
    """Ray actors made by ``make_actor``, started ``size`` at a time."""

    def __init__(self, make_actor: Callable[[], Any], size: int, *,
                 max_replacements: int | None = None, max_task_failures: int = 3):
        self.make_actor = make_actor
        self.pending: dict = {}  # ready-ref -> actor still in its constructor
        self.idle: list = []
        self.replacements_left = 2 * size if max_replacements is None else max_replacements
        self.max_task_failures = max_task_failures
        self.start_error: Exception | None = None
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        actor = self.make_actor()
        self.pending[actor.__ray_ready__.remote()] = actor

    def _replace(self) -> None:
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self._spawn()

    def _promote(self, ready: list) -> None:
        """Move actors whose constructor finished into the idle list; replace those
        whose start failed."""
        import ray
        from ray.exceptions import RayActorError

        for ref in ready:
            actor = self.pending.pop(ref)
            try:
                ray.get(ref)
                self.idle.append(actor)
            except RayActorError as exc:
                log.warning("an actor failed to start: %s", str(exc).splitlines()[0])
                self.start_error = exc
                ray.kill(actor)
                self._replace()

    def _poll(self, timeout: float | None = 0, num_returns: int | None = None) -> int:
        """Promote the actors that finished starting within ``timeout``; how many did."""
        import ray

        if not self.pending:
            return 0
        ready, _ = ray.wait(list(self.pending), num_returns=num_returns or len(self.pending),
                            timeout=timeout)
        self._promote(ready)
        return len(ready)

    def first_actor(self):
        """An actor whose constructor finished (waits for one)."""
        while not self.idle:
            if not self.pending:
                raise RuntimeError("no actor could be started; see the Ray logs") \
                    from self.start_error
            self._poll(timeout=None, num_returns=1)
        return self.idle[0]

    def started(self, grace_s: float, timeout_s: float = 300.0, what: str = "actor") -> list:
        """Wait for the actors to start and return those that did, in start order.

        Once one is up the rest get as long again as it took (at least
        ``grace_s`` seconds: on a busy machine every start-up is slow); those
        still not started are given up (killed), so the group may be smaller
        than asked.
        """
        import ray

        start = time.monotonic()
        deadline = start + timeout_s
        first_up = None
        while self.pending:
            now = time.monotonic()
            if not self._poll(timeout=max(0.0, deadline - now), num_returns=1):
                break
            if self.idle and first_up is None:
                first_up = time.monotonic()
                deadline = min(deadline, first_up + max(grace_s, first_up - start))
        for actor in self.pending.values():
            ray.kill(actor)
        self.pending = {}
        if not self.idle:
            raise RuntimeError(f"no {what} could be started; see the Ray logs") \
                from self.start_error
        return list(self.idle)

    def actors(self) -> list:
        """The started actors, in start order (the ranks of a fixed group)."""
        return list(self.idle)

    def run(self, tasks: Iterable, submit: Callable, done: Callable) -> None:
        """Run ``submit(actor, task)`` for every task; ``done(task, result)`` as results arrive."""
        import ray
        from ray.exceptions import RayActorError

        queue = list(tasks)
        failures: dict = {}
        running: dict = {}
        self.first_actor()
        while queue or running:
            self._poll(timeout=0)
            while queue and self.idle:
                actor = self.idle.pop()
                task = queue.pop(0)
                running[submit(actor, task)] = (actor, task)
            if not running:
                if not self.pending:
                    raise RuntimeError("every actor was lost and none could be replaced; "
                                       "see the Ray logs")
                self.first_actor()
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if not finished:
                continue
            actor, task = running.pop(finished[0])
            try:
                result = ray.get(finished[0])
            except RayActorError:
                key = repr(task)[:200]
                failures[key] = failures.get(key, 0) + 1
                if failures[key] > self.max_task_failures:
                    raise
                log.warning("an actor died; its task goes back to the queue")
                queue.insert(0, task)
                self._replace()
                continue
            self.idle.append(actor)
            done(task, result)
            log.debug("task done; %d queued, %d running", len(queue), len(running))

    def shutdown(self) -> None:
        import ray

        for actor in self.idle + list(self.pending.values()):
            ray.kill(actor)
        self.idle, self.pending = [], {}


# The run-lived groups of the innermost run_lived_actors() block; None outside one.
_RUN_GROUPS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("run_groups",
                                                                          default=None)


def in_run_lived() -> bool:
    """Whether this code runs inside :func:`run_lived_actors`."""
    return _RUN_GROUPS.get() is not None


def release_all() -> None:
    """Shut down the run's groups now (before a stage that needs the whole cluster: Ray
    Train); later stages start theirs again."""
    groups = _RUN_GROUPS.get()
    if groups:
        for group in groups.values():
            group.shutdown()
        groups.clear()


@contextlib.contextmanager
def run_lived_actors() -> Iterator[dict]:
    """Keep the stage actor groups started inside this block until it ends (inside
    another such block: that block's groups, kept until it ends)."""
    outer = _RUN_GROUPS.get()
    if outer is not None:
        yield outer
        return
    groups: dict = {}
    token = _RUN_GROUPS.set(groups)
    try:
        yield groups
    finally:
        _RUN_GROUPS.reset(token)
        for group in groups.values():
            group.shutdown()


def acquire_group(key: Hashable | None, start: Callable[[], ActorGroup]) -> ActorGroup:
    """The run's group for ``key`` inside :func:`run_lived_actors`, else ``start()``'s."""
    groups = _RUN_GROUPS.get()
    if groups is None or key is None:
        return start()
    if key not in groups:
        groups[key] = start()
    return groups[key]


def release_group(key: Hashable | None, group: ActorGroup, failed: bool = False) -> None:
    """Shut ``group`` down unless the run keeps it; a failed stage's group (tasks may still
    run on its actors) is never kept."""
    groups = _RUN_GROUPS.get()
    if groups is not None and key is not None and groups.get(key) is group:
        if not failed:
            return
        del groups[key]
    group.shutdown()


@contextlib.contextmanager
def stage_group(key: Hashable | None, make_actor: Callable[[], Any], size: int,
                **options) -> Iterator[ActorGroup]:
    """The group of one stage call: the run's own for ``key`` inside
    :func:`run_lived_actors` (``key`` None: never shared), else a fresh one."""
    group = acquire_group(key, lambda: ActorGroup(make_actor, size, **options))
    try:
        yield group
    except BaseException:
        release_group(key, group, failed=True)
        raise
    release_group(key, group)
