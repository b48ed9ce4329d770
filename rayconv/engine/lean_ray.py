"""Start a local Ray without the two daemons a one-machine conversion never uses.

``ray.init(address="local")`` starts, next to gcs_server and the raylet (which starts the dashboard and
runtime-env agents, the log monitor and the workers), the **autoscaler monitor** (a local Ray never scales) and
the **dashboard's API server** (job submission and the state API; with ``include_dashboard=False`` it still
starts, in its minimal mode). rayconv uses neither: it schedules its actors itself and talks to the GCS only.
On a 2-core machine their Python start-up competes with everything else Ray starts. Measured on Ray 2.60,
2 cores, three quiet runs each, ``ray.init`` plus two actors ready: 4.47-4.83 s with them, 3.45-3.68 s
without; CPU seconds of Ray's processes 5.5-6.0 with, 3.9-4.4 without.

``ray.init`` has no flag for either, so while it runs :func:`without_unused_daemons` makes ``RayParams`` default
to ``no_monitor=True`` (the option ``ray start --no-monitor`` sets) and ``Node.start_api_server`` do nothing. Both
are private Ray API: where a Ray version lacks them, Ray starts as it would by itself. The log monitor stays: it
carries the workers' log lines to the driver. This module imports nothing of Ray's until it is used, so the
benchmark's measurement of Ray alone (``scripts/bench.py``) can start Ray the same way.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator


@contextlib.contextmanager
def without_unused_daemons() -> Iterator[None]:
    """While the block runs (a local ``ray.init``): no autoscaler monitor, no dashboard API server."""
    try:
        from ray._private import node, parameter

        params_init, start_api_server = parameter.RayParams.__init__, node.Node.start_api_server
    except (ImportError, AttributeError):
        yield
        return
    patch_params = "no_monitor" in inspect.signature(params_init).parameters

    def lean_params(self, *args, **kwargs) -> None:
        kwargs.setdefault("no_monitor", True)
        params_init(self, *args, **kwargs)

    if patch_params:
        parameter.RayParams.__init__ = lean_params
    node.Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        parameter.RayParams.__init__ = params_init
        node.Node.start_api_server = start_api_server
