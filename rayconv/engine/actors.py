"""Ray actor classes (kept apart so importing rayconv does not import ray)."""

from __future__ import annotations

from typing import Any, Callable

import ray

from rayconv import tunables
from rayconv.plan import Unit
from rayconv.receipts import JobContext
from rayconv.engine.units import run_unit


@ray.remote
class ConverterWorker:
    """Holds the job context; converts one unit per call and returns its receipt as a dict."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        tunables.install(ctx.tunables)  # the driver's timeouts and read sizes, in this process too

    def ready(self) -> bool:
        """Answers once the actor is scheduled and constructed (the driver waits on it, bounded)."""
        return True

    def run(self, unit: Unit) -> dict[str, Any]:
        receipt = run_unit(self.ctx, unit)
        receipt.node = ray.get_runtime_context().get_node_id()
        return receipt.to_json()


@ray.remote
class Committer:
    """The reducer: assembles and commits an output tree from the recorded child databases."""

    def __init__(self, knobs: tunables.Tunables) -> None:
        tunables.install(knobs)  # the driver's (its --storage_timeout_s bounds the commit's storage calls)
        import rayconv.targets  # noqa: F401  (the commit's modules, imported while the last units run)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
