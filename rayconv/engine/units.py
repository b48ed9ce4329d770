"""Which function runs a unit: the job context's own ``run`` (an export's, :mod:`rayconv.exporting.worker`), else
convert's :func:`rayconv.worker.run_unit`. The executors and the Ray actors call :func:`run_unit` here, so one
engine (local or Ray, the bounded in-flight queue, the actors' memory reservation) serves both jobs."""

from __future__ import annotations

from typing import Any

from rayconv import worker


def run_unit(ctx: Any, unit: Any) -> Any:
    """Run ``unit`` with the context's own unit function if it has one (its receipt type says how it travels)."""
    own = getattr(ctx, "run", None)
    return own(unit) if own is not None else worker.run_unit(ctx, unit)
