"""``--storage_timeout_s`` bounds storage calls in every process of a run, not only in the driver.

The CLI sets it in the driver (:func:`rayconv.gcs_api.set_timeout`); a Ray worker is another process, so the job
context carries it (``JobContext.storage_timeout``) and the worker actors and the committer apply it when they
start. Asked in the actors' own processes, through Ray (``__ray_call__`` runs a function on the actor).
"""

from __future__ import annotations

from rayconv import gcs_api
from rayconv.receipts import JobContext


def test_the_drivers_storage_timeout_reaches_ray_workers_and_the_committer(ray_session):
    import os

    from rayconv.engine.executors import RayExecutor

    def timeout_here(actor: object) -> tuple[float, int]:  # local: pickled by value, run in the actor's process
        import os

        from rayconv import gcs_api

        return gcs_api.timeout(), os.getpid()

    seconds = 7.5
    assert seconds != gcs_api.DEFAULT_TIMEOUT  # else this would prove nothing
    previous = gcs_api.timeout()
    gcs_api.set_timeout(seconds)  # what the CLI's --storage_timeout_s does in the driver
    try:
        ctx = JobContext(spec=None, shards=(), kinds=(), quantize_type=None, arrays={}, items={})  # type: ignore
        executor = RayExecutor(address=None, num_workers=1, worker_memory_gb=0.25)
        try:
            executor.start(ctx)
            actors = [*executor._actors, executor._new_committer()]
            executor._committer = actors[-1]  # shutdown() kills it
            asked = ray_session.get([actor.__ray_call__.remote(timeout_here) for actor in actors])
        finally:
            executor.shutdown()
    finally:
        gcs_api.set_timeout(previous)
    assert ctx.storage_timeout == seconds
    assert all(pid != os.getpid() for _, pid in asked), asked  # really other processes
    assert [value for value, _ in asked] == [seconds, seconds], asked
