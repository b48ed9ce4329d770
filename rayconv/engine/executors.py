"""Where units run: in this process (``local``) or on Ray actors (``ray``). Both yield receipts.

The Ray layer is deliberately thin: actors hold the (small) JobContext and call
:func:`rayconv.worker.run_unit`; the driver streams units to them through ``ray.wait`` with a
bounded number in flight, and a Committer actor runs the commit. Arguments and results are plans
and receipts — a few KB — so no tensor bytes enter the object store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Any, Callable, Iterator, Sequence

from rayconv import interrupt, tunables
from rayconv.engine import watchdog
from rayconv.engine.lean_ray import without_unused_daemons
from rayconv.errors import ConversionError, user_error
from rayconv.job import GiB
from rayconv.plan import Unit
from rayconv.progress import LOG
from rayconv.receipts import JobContext, Receipt
from rayconv.sink.commit import stop_point
from rayconv.engine.units import run_unit

#: How rayconv starts a local Ray (scripts/bench.py measures Ray alone with the same): a new private Ray, no
#: dashboard, a small object store (only plans and receipts pass through it); and, around ray.init,
#: :func:`rayconv.engine.lean_ray.without_unused_daemons` (no autoscaler monitor, no dashboard API server).
LOCAL_RAY: dict[str, Any] = {"address": "local", "include_dashboard": False, "logging_level": "WARNING",
                             "object_store_memory": 256 * 1024 * 1024}
#: While units run, a line is logged whenever none has finished for this long (never wait silently).
WAIT_LOG_SECONDS = 60.0


class LocalExecutor:
    """Runs units one after another in the driver process (debugging, and the reference path)."""

    name = "local"

    def __init__(self) -> None:
        self.workers = 1

    def start(self, ctx: JobContext) -> None:
        pass

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


def _job_env_keys() -> set[str]:
    """Variables the enclosing Ray job's runtime_env already sets (Ray refuses to merge a second value)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def _forwarded_env() -> dict[str, str]:
    """Storage endpoints the workers must see, and the test hooks (``RAYCONV_TEST_*``); credentials stay wherever
    ADC finds them. rayconv's own knobs travel in the job context (``JobContext.tunables``), not here."""
    prefixes = ("TENSORSTORE_", "STORAGE_EMULATOR_HOST", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_CLOUD_PROJECT",
                "GOOGLE_APPLICATION_CREDENTIALS", "RAYCONV_TEST_")
    inherited = _job_env_keys()
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes) and k not in inherited}


def _ray_init(ray: Any, **kwargs: Any) -> None:
    """ray.init with SIGTERM and SIGINT held (:func:`rayconv.interrupt.held`): acted on once it has returned.

    Left to itself, Ray replaces the SIGTERM handler three times while it starts: ``sys.exit(15)`` in init, the
    local node's (kill its processes, ``sys.exit(1)``), and, from the moment the core worker connects, a C++
    failure handler that prints a stack dump and aborts (exit 134). :func:`_ray_keeps_off_signals` stops all
    three; a signal that came meanwhile then stops the run with rayconv's one line (the Ray it started goes at
    exit, and with the watchdog).
    """
    with interrupt.held() as retake, _ray_keeps_off_signals(retake):
        ray.init(**kwargs)


@contextlib.contextmanager
def _ray_keeps_off_signals(retake: Callable[[], None]) -> Iterator[None]:
    """While ray.init runs: Ray's ``set_sigterm_handler`` does nothing, and the driver's core worker is created
    with ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` on (Ray reads it from ``ray_constants`` when the core worker is
    created, not from the environment: set for that call only, in this process only, the local Ray's own
    processes keep their crash dumps); the holding handlers are taken back right after. Private Ray API, like
    :mod:`rayconv.engine.lean_ray`: where a Ray version lacks it, the handlers are taken back after init only.
    """
    try:
        from ray import _raylet
        from ray._private import ray_constants, utils

        set_sigterm_handler, core_worker = utils.set_sigterm_handler, _raylet.CoreWorker
        no_failure_handler = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    except (ImportError, AttributeError):
        yield
        return

    def connect(*args: Any, **kwargs: Any) -> Any:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        try:
            worker = core_worker(*args, **kwargs)
        finally:
            ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = no_failure_handler
        stop_point("ray_init")  # test hook: the driver's core worker is connected
        retake()
        return worker

    utils.set_sigterm_handler = lambda handler: None
    _raylet.CoreWorker = connect
    try:
        yield
    finally:
        utils.set_sigterm_handler, _raylet.CoreWorker = set_sigterm_handler, core_worker
        retake()


def _check_reachable(target: str, origin: str, timeout: float = 10.0) -> None:
    """Fail in seconds, not after Ray's minutes of reconnect attempts, when a host:port address is not listening."""
    if target == "auto" or "://" in target or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        raise ConversionError(f"{origin} {target!r} is not a Ray address (host:port, auto, or ray://host:port)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot reach the Ray cluster at {target} ({origin}): {exc}") from None


def _unwrap(exc: BaseException) -> BaseException:
    """A Ray task failure as the user error it carries (re-raised as itself), else unchanged (a bug)."""
    return user_error(exc) or exc


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What the live nodes of a Ray cluster can host: totals, and how many workers fit node by node."""

    cpus: float
    memory: float
    nodes: int
    fit: int

    @classmethod
    def of(cls, nodes: list[dict[str, Any]], worker_memory: int) -> "Capacity":
        alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
        fit = sum(min(int(r.get("CPU", 0)), int(r.get("memory", 0) // worker_memory)) for r in alive)
        return cls(cpus=sum(r.get("CPU", 0) for r in alive), memory=sum(r.get("memory", 0) for r in alive),
                   nodes=len(alive), fit=fit)

    def describe(self) -> str:
        return f"{self.cpus:g} CPUs and {self.memory / GiB:.1f} GiB of memory on {self.nodes} node(s)"


class RayExecutor:
    """Memory-pinned worker actors on a local or existing Ray cluster.

    Where: an explicit ``address``, else the cluster ``RAY_ADDRESS`` names (set inside ``ray job submit``
    and on Ray workers), else a local Ray started here, which dies with this process (:mod:`watchdog`).
    How many: each worker needs 1 CPU and ``worker_memory_gb`` on one node. On a local Ray more workers than
    fit are clamped with a warning; on an existing cluster (which may still be scaling up) the missing ones
    are waited for, with a log line saying what for, at most ``start_timeout`` seconds.
    """

    name = "ray"

    def __init__(self, *, address: str | None, num_workers: int | None, worker_memory_gb: float,
                 max_restarts: int = 3, num_cpus: int | None = None, start_timeout: float = 600.0) -> None:
        import ray

        self._ray = ray
        self.worker_memory = int(worker_memory_gb * GiB)
        self.worker_memory_gb = worker_memory_gb
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self._actors: list[Any] = []
        self._committer: Any = None  # started while the last units run (see run)
        self.local = self._connect(address, num_cpus)
        capacity = Capacity.of(ray.nodes(), self.worker_memory)
        self.capacity = capacity
        self.workers = self._choose_workers(num_workers, capacity)
        LOG.info("Ray cluster: %d CPUs, %.1f GiB memory, %d nodes; starting %d workers with %.1f GiB each",
                 int(capacity.cpus), capacity.memory / GiB, capacity.nodes, self.workers, worker_memory_gb)

    def _connect(self, address: str | None, num_cpus: int | None) -> bool:
        """Connect to (or start) Ray; True when this process started a local Ray."""
        ray = self._ray
        if ray.is_initialized():
            return False
        target = address or os.environ.get("RAY_ADDRESS")
        if target:
            # Workers on other nodes do not inherit this process's environment: forward the storage settings.
            # Inside `ray job submit` RAY_ADDRESS names the job's cluster: connect to it, as ray.init() does.
            LOG.debug("Connecting to the Ray cluster at %s", target)
            _check_reachable(target, "--address" if address else "RAY_ADDRESS")
            try:
                _ray_init(ray, address=address or "auto", runtime_env={"env_vars": _forwarded_env()},
                          log_to_driver=True, logging_level="WARNING")
            except ConnectionError as exc:
                raise ConversionError(f"cannot connect to the Ray cluster at {target}: {exc}") from exc
            return False
        # A local Ray's workers inherit this environment; a runtime_env would only slow their start.
        # address="local": a new private Ray, never one that `ray start` recorded in /tmp/ray/ray_current_cluster
        # (ray.init() would silently join that one, and refuse object_store_memory).
        watchdog.start()
        with without_unused_daemons():
            _ray_init(ray, num_cpus=num_cpus, **LOCAL_RAY, configure_logging=True)
        return True

    def _needs(self) -> str:
        return f"1 CPU and {self.worker_memory_gb:g} GiB of memory on one node"

    def _choose_workers(self, requested: int | None, capacity: Capacity) -> int:
        if requested is None:
            if capacity.fit < 1:
                raise ConversionError(
                    f"no Ray node can host a worker ({self._needs()}): the cluster has {capacity.describe()}; "
                    "lower --worker_memory_gb" + ("" if self.local else ", or give --num_workers to wait for "
                                                                          "nodes to join"))
            return capacity.fit
        if requested <= capacity.fit:
            return requested
        if self.local:
            if capacity.fit < 1:
                raise ConversionError(f"this machine cannot host a worker ({self._needs()}): its Ray has "
                                      f"{capacity.describe()}; lower --worker_memory_gb")
            LOG.warning("--num_workers %d: this machine fits %d workers (each %s; it has %s); starting %d",
                        requested, capacity.fit, self._needs(), capacity.describe(), capacity.fit)
            return capacity.fit
        LOG.warning("--num_workers %d: the Ray cluster fits %d now (each %s; it has %s); waiting up to %.0f s "
                    "for nodes to join (--worker_start_timeout)", requested, capacity.fit, self._needs(),
                    capacity.describe(), self.start_timeout)
        return requested

    def _start(self, ctx: JobContext) -> None:
        """Create the actors and wait, bounded and never silently, until they are scheduled."""
        from rayconv.engine.actors import ConverterWorker

        ray = self._ray
        actors = [
            ConverterWorker.options(name=f"rayconv-worker-{i}", num_cpus=1, memory=self.worker_memory,
                                    max_restarts=self.max_restarts, max_task_retries=self.max_restarts,
                                    scheduling_strategy="SPREAD").remote(ctx)
            for i in range(self.workers)
        ]
        self._actors = actors
        by_ref = {actor.ready.remote(): actor for actor in actors}
        pending = list(by_ref)
        started = time.monotonic()
        next_log = started + 10
        while pending:
            now = time.monotonic()
            remaining = started + self.start_timeout - now
            if remaining <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(remaining, 5.0))
            try:
                ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                raise _unwrap(exc) from None
            if pending and time.monotonic() >= next_log:
                next_log = time.monotonic() + 30
                LOG.warning("Waiting for %d of %d workers to be scheduled and started (each needs %s; the cluster "
                            "has %s); giving up after %.0f s (--worker_start_timeout)", len(pending), len(actors),
                            self._needs(), Capacity.of(ray.nodes(), self.worker_memory).describe(),
                            self.start_timeout)
        if not pending:
            return
        for ref in pending:
            ray.kill(by_ref[ref])
        self._actors = [by_ref[ref] for ref in by_ref if ref not in pending]
        capacity = Capacity.of(ray.nodes(), self.worker_memory)
        if not self._actors:
            raise ConversionError(f"no worker could be scheduled within {self.start_timeout:.0f} s: each needs "
                                  f"{self._needs()}, the cluster has {capacity.describe()} (fits {capacity.fit}); "
                                  "add nodes, lower --worker_memory_gb or raise --worker_start_timeout")
        LOG.warning("%d of %d workers could not be scheduled within %.0f s (each needs %s; the cluster has %s); "
                    "continuing with %d", len(pending), len(actors), self.start_timeout, self._needs(),
                    capacity.describe(), len(self._actors))
        self.workers = len(self._actors)

    def start(self, ctx: JobContext) -> None:
        """Start the worker actors (the driver times it apart from the conversion); run() does it otherwise."""
        if not self._actors:
            self._start(ctx)

    def run(self, ctx: JobContext, units: Sequence[Unit]) -> Iterator[Receipt]:
        ray = self._ray
        if not units:
            return
        self.start(ctx)
        queue = list(reversed(units))
        receipt_type = getattr(ctx, "receipt_type", Receipt)  # an export's receipts are its own (rayconv.exporting)
        in_flight: dict[Any, tuple[int, Unit]] = {}

        def submit(actor_index: int) -> None:
            if queue:
                unit = queue.pop()
                ref = self._actors[actor_index].run.options(name=f"unit-{unit.id}").remote(unit)
                in_flight[ref] = (actor_index, unit)
            elif self._committer is None and getattr(ctx, "needs_committer", True):
                # Every unit is handed out: start the committer now, so its process start and imports
                # (~1 s) overlap the last units instead of following them (it needs no CPU of its own).
                self._committer = self._new_committer(len(ctx.target.kinds))

        for i in range(len(self._actors)):
            for _ in range(2):  # two per actor: one reading while one writes
                submit(i)
        last = time.monotonic()
        try:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_LOG_SECONDS)
                if not ready:
                    LOG.info("Waiting for %d unit(s) on %d worker(s); none finished in the last %.0f s",
                             len(in_flight), len(self._actors), time.monotonic() - last)
                    continue
                ref = ready[0]
                actor_index, unit = in_flight.pop(ref)
                try:
                    receipt = receipt_type.from_json(ray.get(ref))
                except ray.exceptions.RayTaskError as exc:
                    raise _unwrap(exc) from None
                last = time.monotonic()
                submit(actor_index)
                yield receipt
        finally:
            for ref in in_flight:
                ray.cancel(ref)

    def _new_committer(self, outputs: int = 1) -> Any:
        """The committer actor, running up to ``outputs`` commits at once (one per output of the target)."""
        from rayconv.engine.actors import Committer

        return Committer.options(name="rayconv-committer", num_cpus=0,
                                 max_concurrency=max(1, outputs)).remote(tunables.current())

    def call_all(self, calls: Sequence[tuple[Callable[..., Any], tuple, dict]]) -> list[Any]:
        """Run the commit calls concurrently on one committer actor (the reducer; one call per output)."""
        committer, self._committer = self._committer or self._new_committer(len(calls)), None
        try:
            refs = [committer.call.options(name=f"commit-{i}").remote(fn, *args, **kwargs)
                    for i, (fn, args, kwargs) in enumerate(calls)]
            return self._ray.get(refs)
        except self._ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None
        finally:
            self._ray.kill(committer)

    def shutdown(self) -> None:
        for actor in self._actors + ([self._committer] if self._committer is not None else []):
            self._ray.kill(actor)
        self._actors, self._committer = [], None


def make_executor(options: Any) -> LocalExecutor | RayExecutor:
    """The executor a job's engine flags ask for (``--executor``, ``--address``, ``--num_workers``,
    ``--worker_memory_gb``, ``--worker_start_timeout``): convert's and export's options carry the same fields."""
    if options.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=options.address, num_workers=options.num_workers,
                       worker_memory_gb=options.worker_memory_gb, start_timeout=options.worker_start_timeout)
