"""``--storage_timeout_s``, ``--http_timeout_s`` and the RAYCONV_* read sizes hold in every process of a run, not
only in the driver.

The driver installs the job's tunables (:func:`rayconv.tunables.install`); a Ray worker is another process, so the
job context carries them (``JobContext.tunables``) and the worker actors and the committer install them when they
start — no environment variable involved. Asked in the actors' own processes, through Ray (``__ray_call__`` runs a
function on the actor).
"""

from __future__ import annotations

import os

from rayconv import tunables
from rayconv.acquire import Acquisition
from rayconv.receipts import JobContext
from rayconv.tunables import Tunables


def test_the_drivers_tunables_reach_ray_workers_and_the_committer(ray_session):
    from rayconv.engine.executors import RayExecutor

    def asked_here(actor: object) -> tuple[float, float, int, int, str | None, int]:
        # local: pickled by value, run in the actor's process
        import os

        from rayconv import gcs_api
        from rayconv.source.gcs import GcsObject
        from rayconv.source.http import HttpFile

        http = HttpFile("http://127.0.0.1:9/x", size=1)
        gcs = GcsObject("gs://b/x", size=1)
        return (gcs_api.timeout(), http.timeout_s, http.chunk_size, gcs.chunk_size,
                os.environ.get("RAYCONV_HTTP_TIMEOUT_S"), os.getpid())

    knobs = Tunables(storage_timeout_s=7.5, http_timeout_s=3.25, http_chunk_mb=3, gcs_chunk_mb=5)
    defaults = Tunables()
    assert all(getattr(knobs, f) != getattr(defaults, f)  # else this would prove nothing
               for f in ("storage_timeout_s", "http_timeout_s", "http_chunk_mb", "gcs_chunk_mb"))
    assert "RAYCONV_HTTP_TIMEOUT_S" not in os.environ
    previous = tunables.current()
    tunables.install(knobs)  # what the driver does with ConvertOptions.tunables
    try:
        ctx = JobContext(spec=None, tensor_files=(), kinds=(), quantize_type=None, arrays={}, items={})  # type: ignore
        executor = RayExecutor(address=None, num_workers=1, worker_memory_gb=0.25)
        try:
            executor.start(ctx)
            actors = [*executor._actors, executor._new_committer()]
            executor._committer = actors[-1]  # shutdown() kills it
            asked = ray_session.get([actor.__ray_call__.remote(asked_here) for actor in actors])
        finally:
            executor.shutdown()
    finally:
        tunables.install(previous)
    assert ctx.tunables == knobs
    assert all(answer[-1] != os.getpid() for answer in asked), asked  # really other processes
    assert [answer[:-1] for answer in asked] == [(7.5, 3.25, 3 << 20, 5 << 20, None)] * 2, asked


def test_options_tunables_are_what_the_driver_installs(tmp_path, monkeypatch):
    """The driver installs ConvertOptions.tunables at the start of the job, before acquiring or indexing the input:
    a run's knobs are its options', whatever this process had before."""
    from conftest import MODELS, synthetic_checkpoint

    import rayconv.engine.driver as driver
    from rayconv.job import ConvertOptions

    seen: list[Tunables] = []
    real = driver.open_checkpoint

    def spy(options):  # the job's first read of the input: which tunables hold in this process then?
        seen.append(tunables.current())
        return real(options)

    monkeypatch.setattr(driver, "open_checkpoint", spy)
    model = MODELS["llama3-mp1"][0]
    knobs = Tunables(storage_timeout_s=11.0, http_retries=2, lock_stale_s=42.0)
    previous = tunables.current()
    assert previous != knobs
    try:
        driver.convert(ConvertOptions(files={}, input_display="?", output=str(tmp_path / "out"), model_name=model.family,
                                      executor="local", progress=False, tunables=knobs,
                                      acquire=Acquisition(input_directory=str(synthetic_checkpoint(model)))))
    finally:
        tunables.install(previous)
    assert seen == [knobs]
    assert (tmp_path / "out" / "bf16/scanned/0/commit_success.txt").exists()
