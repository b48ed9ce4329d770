"""Pre-imported fork server for the MaxText reference scripts (runs in the REFERENCE env, Python 3.12).

Every reference script spends ~16 s importing jax/torch/orbax/maxtext before doing ~1-10 s of work. This server
imports those modules once (without initialising any jax backend), then runs each script in an ``os.fork()`` of
itself, so a run starts with the imports done. ``reference.py`` starts one server per maxtext version (opt-in:
``MaxTextReference(fork_server=True)``, used by the tests; the benchmark keeps the plain subprocess, which measures
MaxText's real time and memory).

Protocol (JSON lines; requests on stdin, replies on the original stdout, everything else goes to stderr):

* on start:  ``{"ready": true, "pid", "preloaded": [...], "failed": {module: error}, "threads": n}``;
* request:   ``{"script", "argv", "cwd", "stdout", "stderr", "env", "timeout"}``;
* replies:   ``{"pid": child}`` as soon as the child exists, then ``{"rc", "maxrss_kb", "timed_out"}``.

The server exits when stdin closes, i.e. when the process that started it exits or closes it.

Fork safety: the server must not fork with live threads (a lock held by another thread would stay locked forever
in the child). The one exception is numpy's OpenBLAS pool (1 thread on 2 cores, started by ``import numpy``): it
stops itself in a ``pthread_atfork`` handler and restarts lazily in the child (measured: a forked child has 1 thread
and 2 after a matmul). So the server counts its threads right after numpy and refuses to serve if any later
import started another (measured: none of PRELOAD does). jax's
backend (which reads ``XLA_FLAGS``, e.g. the 16 simulated devices of scanned.py) is created lazily by the first
``jax.devices()``/array, so it happens in the child, after the script's ``_common.bootstrap`` has set the flags;
the server fails its start if any preload initialised a backend.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import traceback

#: What the scripts import (the union over scanned, scanned_hf, unscanned, quantized, load_check, logits and
#: _common, for both maxtext versions). A module that fails to import is skipped: the child imports it itself.
PRELOAD = (
    "numpy",
    "jax",
    "jax.numpy",
    "torch",
    "tensorstore",
    "orbax.checkpoint",
    "flax",
    "flax.linen",
    "flax.nnx",
    "maxtext.configs.pyconfig",
    "maxtext.common.common_types",
    "maxtext.utils.maxtext_utils",
    "maxtext.checkpoint_conversion.standalone_scripts.llama_or_mistral_ckpt",
    "maxtext.utils.generate_param_only_checkpoint",
    "maxtext.checkpoint_conversion.load_and_quantize_checkpoint",  # 0.2.4 int8 reference
    "maxtext.utils.layerwise_quantization",  # 0.2.5 int8 reference
    "maxtext.inference.maxengine.maxengine",
)

PR_SET_PDEATHSIG = 1


def preload(names: tuple[str, ...] = PRELOAD) -> tuple[list[str], dict[str, str]]:
    """Import ``names``; return (imported, {name: error}) - a failure only costs that module's import time."""
    done, failed = [], {}
    for name in names:
        try:
            importlib.import_module(name)
            done.append(name)
        except BaseException as e:  # noqa: BLE001 - any import failure just leaves the import to the child
            failed[name] = f"{type(e).__name__}: {e}"[:500]
    return done, failed


def jax_backend_initialised() -> bool:
    """True if a preload created a jax backend (it would have read XLA_FLAGS before the scripts set them)."""
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def thread_count() -> int:
    """OS threads of this process (/proc counts native threads too, which threading.enumerate does not)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def send(fd: int, msg: dict) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def exit_code(code: object) -> int:
    """Python's own mapping of ``SystemExit.code`` to the process exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def die_with_parent(server_pid: int) -> None:
    """SIGKILL this child when the server dies: an orphaned run must not keep writing into a cache entry."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != server_pid:  # the server died before prctl took effect
        os._exit(70)


def redirect(path: str, fd: int, flags: int) -> None:
    target = os.open(path, flags, 0o644)
    os.dup2(target, fd)
    os.close(target)


def import_env_changes(before: dict[str, str]) -> dict[str, str | None]:
    """What the preloads did to os.environ ({name: new value, or None if removed}). Measured: maxtext/TF imports
    set e.g. TF2_BEHAVIOR=1, TPU_SKIP_MDS_QUERY=1, HF_DATASETS_DISABLE_DILL=1; a plain run has them after its own
    imports, so the child reapplies them on top of the request's env."""
    changes: dict[str, str | None] = {k: v for k, v in os.environ.items() if before.get(k) != v}
    changes.update({k: None for k in before if k not in os.environ})
    return changes


def set_env(env: dict[str, str], changes: dict[str, str | None]) -> None:
    os.environ.clear()
    os.environ.update(env)
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def child(req: dict, private_fds: tuple[int, ...], server_pid: int, env_changes: dict[str, str | None]) -> None:
    """The forked run: the script's environment, cwd, argv and output files, as a plain ``python script`` gets."""
    code = 1
    try:
        for fd in private_fds:
            os.close(fd)
        die_with_parent(server_pid)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        set_env(req["env"], env_changes)
        os.chdir(req["cwd"])
        redirect(os.devnull, 0, os.O_RDONLY)
        redirect(req["stdout"], 1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        redirect(req["stderr"], 2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        script = req["script"]
        sys.argv = [script, *req["argv"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` sets it
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = exit_code(e.code)
        except BaseException:  # noqa: BLE001 - reported like an uncaught exception in `python script`
            traceback.print_exc()
            code = 1
    except BaseException:  # noqa: BLE001 - setting up the child failed
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve_one(req: dict, reply_fd: int, private_fds: tuple[int, ...], env_changes: dict[str, str | None]) -> None:
    """Fork one run, report its pid, wait for it (killing it after ``timeout`` s), report its status."""
    sys.stdout.flush()
    sys.stderr.flush()
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        child(req, private_fds, server_pid, env_changes)
    send(reply_fd, {"pid": pid})
    timed_out = False

    def on_alarm(_signum, _frame) -> None:
        # The child is ours and not yet reaped, so its pid cannot have been reused.
        nonlocal timed_out
        timed_out = True
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    if req.get("timeout"):
        signal.setitimer(signal.ITIMER_REAL, float(req["timeout"]))
    try:
        _, status, usage = os.wait4(pid, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    send(reply_fd, {"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss, "timed_out": timed_out})


def check_ready(numpy_threads: int) -> str | None:
    """Why forking this server would not give a faithful run, or None."""
    if jax_backend_initialised():
        return "a preloaded module initialised a jax backend"
    threads = thread_count()
    if threads > numpy_threads:
        return f"{threads - numpy_threads} thread(s) started by the imports after numpy: forking is not safe"
    return None


def main() -> None:
    # Keep the protocol pipes on private fds; fd 1 becomes stderr so import/script noise cannot corrupt replies.
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    redirect(os.devnull, 0, os.O_RDONLY)
    env_before = dict(os.environ)
    done, failed = preload(PRELOAD[:1])  # numpy: its OpenBLAS pool is the one fork-safe thread
    numpy_threads = thread_count()
    more, more_failed = preload(PRELOAD[1:])
    done, failed = done + more, {**failed, **more_failed}
    env_changes = import_env_changes(env_before)
    error = check_ready(numpy_threads)
    ready = {"ready": error is None, "pid": os.getpid(), "preloaded": done, "failed": failed,
             "threads": thread_count(), "numpy_threads": numpy_threads}
    if error:
        ready["error"] = error
    send(reply_fd, ready)
    if not ready["ready"]:
        return
    private = (requests.fileno(), reply_fd)
    for line in iter(requests.readline, b""):
        serve_one(json.loads(line), reply_fd, private, env_changes)
    os._exit(0)  # stdin closed: skip the interpreter's ~4 s teardown of everything preloaded


if __name__ == "__main__":
    main()
