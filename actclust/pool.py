"""A work queue over a pool of Ray actors that survives lost actors and nodes.

Each task goes to an idle actor; when an actor dies (its process or its node is
lost) its task is put back at the front of the queue and a replacement actor is
requested. A replacement joins the pool only once its constructor has finished,
so when it cannot be placed (the cluster lost the resources) the pool simply
goes on with the actors it has. Actors are created with ``max_restarts=0``: a
Ray-level restart that cannot be placed would leave its task hanging, while the
pool's own retry always makes progress.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class ActorPool:
    """Run ``submit(actor, task)`` for every task; ``done(task, result)`` as results arrive."""

    def __init__(self, make_actor: Callable[[], Any], size: int, *,
                 max_replacements: int | None = None, max_task_failures: int = 3):
        self.make_actor = make_actor
        self.pending: dict = {}  # ready-ref -> actor still in its constructor
        self.idle: list = []
        for _ in range(size):
            self._spawn()
        self.replacements_left = 2 * size if max_replacements is None else max_replacements
        self.max_task_failures = max_task_failures
        self.start_error: Exception | None = None

    def _spawn(self) -> None:
        actor = self.make_actor()
        self.pending[actor.__ray_ready__.remote()] = actor

    def _promote(self, timeout: float | None = 0) -> None:
        """Move actors whose constructor finished into the idle list."""
        import ray
        from ray.exceptions import RayActorError

        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in ready:
            actor = self.pending.pop(ref)
            try:
                ray.get(ref)
                self.idle.append(actor)
            except RayActorError as exc:
                log.warning("an actor of the pool failed to start: %s", str(exc).splitlines()[0])
                self.start_error = exc

    def first_actor(self):
        """An actor whose constructor finished (waits for one)."""
        import ray

        while not self.idle:
            if not self.pending:
                raise RuntimeError("no actor of the pool could be started") from self.start_error
            ray.wait(list(self.pending), num_returns=1)
            self._promote(timeout=0)
        return self.idle[0]

    def run(self, tasks: Iterable, submit: Callable, done: Callable) -> None:
        import ray
        from ray.exceptions import RayActorError

        queue = list(tasks)
        failures: dict = {}
        running: dict = {}
        self.first_actor()
        while queue or running:
            self._promote(timeout=0)
            while queue and self.idle:
                actor = self.idle.pop()
                task = queue.pop(0)
                running[submit(actor, task)] = (actor, task)
            if not running:
                if not self.pending:
                    raise RuntimeError("every actor of the pool was lost and none could be "
                                       "replaced; see the Ray logs")
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
                if self.replacements_left > 0:
                    self.replacements_left -= 1
                    self._spawn()
                continue
            self.idle.append(actor)
            done(task, result)
            log.debug("task done; %d queued, %d running", len(queue), len(running))

    def shutdown(self) -> None:
        import ray

        for actor in self.idle + list(self.pending.values()):
            ray.kill(actor)
        self.idle, self.pending = [], {}
