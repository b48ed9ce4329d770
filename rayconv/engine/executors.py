"""Where units run: in this process (``local``) or on Ray actors (``ray``). Both yield receipts.

The Ray layer is deliberately thin: actors hold the (small) JobContext and call
:func:`rayconv.worker.run_unit`; the driver streams units to them through ``ray.wait`` with a
bounded number in flight, and a Committer actor runs the commit. Arguments and results are plans
and receipts — a few KB — so no tensor bytes enter the object store.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

from rayconv.errors import ConversionError
from rayconv.plan import Unit
from rayconv.progress import LOG
from rayconv.worker import JobContext, Receipt, run_unit

GiB = 1 << 30


class LocalExecutor:
    """Runs units one after another in the driver process (debugging, and the reference path)."""

    name = "local"

    def __init__(self) -> None:
        self.workers = 1

    def run(self, ctx: JobContext, units: Sequence[Unit]) -> Iterator[Receipt]:
        for unit in units:
            yield run_unit(ctx, unit)

    def call_all(self, calls: Sequence[tuple[Callable[..., Any], tuple, dict]]) -> list[Any]:
        """Run the commit calls concurrently (each output's merge is independent)."""
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
            futures = [pool.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]
            return [f.result() for f in futures]

    def shutdown(self) -> None:
        pass


def _forwarded_env() -> dict[str, str]:
    """Storage endpoints the workers must see; credentials stay wherever ADC finds them."""
    prefixes = ("TENSORSTORE_", "STORAGE_EMULATOR_HOST", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_CLOUD_PROJECT",
                "GOOGLE_APPLICATION_CREDENTIALS", "RAYCONV_")
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


class RayExecutor:
    """Memory-pinned worker actors on a local or existing Ray cluster."""

    name = "ray"

    def __init__(self, *, address: str | None, num_workers: int | None, worker_memory_gb: float,
                 max_restarts: int = 3, num_cpus: int | None = None) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            if address:
                # Workers on other nodes do not inherit this process's environment: forward the storage settings.
                ray.init(address=address, runtime_env={"env_vars": _forwarded_env()}, log_to_driver=True,
                         logging_level="WARNING")
            else:
                # A local Ray's workers inherit this environment; a runtime_env would only slow their start.
                ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                         object_store_memory=256 * 1024 * 1024, configure_logging=True)
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        memory = float(resources.get("memory", 0))
        by_memory = int(memory // (worker_memory_gb * GiB)) if memory else cpus
        self.workers = max(1, num_workers or min(cpus, by_memory))
        if num_workers is None and by_memory < 1:
            raise ConversionError(f"the Ray cluster has {memory / GiB:.1f} GiB of memory, less than one worker's "
                                  f"budget of {worker_memory_gb} GiB (lower --worker_memory_gb)")
        self.worker_memory = int(worker_memory_gb * GiB)
        self.max_restarts = max_restarts
        self._actors: list[Any] = []
        LOG.info("Ray cluster: %d CPUs, %.1f GiB memory, %d nodes; starting %d workers with %.1f GiB each",
                 cpus, memory / GiB, len([n for n in ray.nodes() if n.get("Alive")]), self.workers, worker_memory_gb)

    def _start(self, ctx: JobContext) -> None:
        from rayconv.engine.actors import ConverterWorker

        self._actors = [
            ConverterWorker.options(name=f"rayconv-worker-{i}", num_cpus=1, memory=self.worker_memory,
                                    max_restarts=self.max_restarts, max_task_retries=self.max_restarts,
                                    scheduling_strategy="SPREAD").remote(ctx)
            for i in range(self.workers)
        ]

    def run(self, ctx: JobContext, units: Sequence[Unit]) -> Iterator[Receipt]:
        ray = self._ray
        if not units:
            return
        self._start(ctx)
        queue = list(reversed(units))
        in_flight: dict[Any, tuple[int, Unit]] = {}

        def submit(actor_index: int) -> None:
            if queue:
                unit = queue.pop()
                ref = self._actors[actor_index].run.options(name=f"unit-{unit.id}").remote(unit)
                in_flight[ref] = (actor_index, unit)

        for i in range(len(self._actors)):
            for _ in range(2):  # two per actor: one reading while one writes
                submit(i)
        try:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                ref = ready[0]
                actor_index, unit = in_flight.pop(ref)
                try:
                    receipt = Receipt.from_json(ray.get(ref))
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if hasattr(exc, "cause") else None
                    if isinstance(cause, ConversionError):
                        raise cause from None
                    raise
                submit(actor_index)
                yield receipt
        finally:
            for ref in in_flight:
                ray.cancel(ref)

    def call_all(self, calls: Sequence[tuple[Callable[..., Any], tuple, dict]]) -> list[Any]:
        """Run the commit calls concurrently on one committer actor (the reducer)."""
        from rayconv.engine.actors import Committer

        committer = Committer.options(name="rayconv-committer", num_cpus=0,
                                      max_concurrency=max(1, len(calls))).remote()
        try:
            refs = [committer.call.options(name=f"commit-{i}").remote(fn, *args, **kwargs)
                    for i, (fn, args, kwargs) in enumerate(calls)]
            return self._ray.get(refs)
        except self._ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ConversionError):
                raise cause from None
            raise
        finally:
            self._ray.kill(committer)

    def shutdown(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
