"""MaxText reference harness, used by the tests and scripts/ in the MAIN env (Python 3.11).

rayconv's parity tests compare its output bit-for-bit with what MaxText's OWN converter scripts write for
the same synthetic input, and check that MaxText's own loader restores what rayconv writes. MaxText
(0.2.4, classic Linen layout) needs Python 3.12 and a different jax, so it runs in a separate venv: the
scripts next to this module (``tools/maxtext_ref/*.py``) are executed there through ``subprocess``.

* ``RAYCONV_REF_PYTHON``   - the reference env's python (default ``<repo>/.venvs/ref/bin/python``)
* ``RAYCONV_MAXTEXT_PATH`` - maxtext 0.2.4 installed with ``pip install --no-deps --target`` (default
  ``<repo>/.venvs/maxtext-0.2.4``); put first on the child's PYTHONPATH
* ``RAYCONV_MAXTEXT_025_PATH`` - maxtext 0.2.5, likewise (default ``<repo>/.venvs/maxtext-0.2.5``); the same
  Python env serves both versions (measured: 0.2.5 imports and runs on the 0.2.4 dependency set)

Two references: ``MaxTextReference(maxtext="0.2.4")`` drives 0.2.4 with its NNX switches off (the classic Linen
trees JetStream-MaxText loads: rayconv's ``--maxtext_layout linen``); ``maxtext="0.2.5"`` drives 0.2.5 with
default flags (NNX decode trees: ``--maxtext_layout nnx``). Its unscanned reference is 0.2.5's
generate_param_only_checkpoint, its int8 reference is ``maxtext.utils.layerwise_quantization``, and load_check /
logits use 0.2.5's MaxEngine.
* ``RAYCONV_REF_CACHE``    - default cache directory (default ``<repo>/.cache/maxtext-ref``)

Every MaxText run costs ~10-15 s and ~1.8 GB RSS just to import torch/TF/jax, so all outputs are cached
under ``cache_dir``, keyed by a hash of the model spec, the script sources (``tools/maxtext_ref/*.py``, by file
name and contents, never by path: editing a script invalidates its entries, moving it does not) and the installed
maxtext version; only what the code does counts, not its comments or docstrings (``_code_of``).
Entries are built in a temp dir and renamed into place; a file lock per entry makes concurrent test processes share one run,
and a global lock keeps at most one MaxText process running at a time (2-core machine).

``MaxTextReference(..., fork_server=True)`` (the tests) runs each script as an ``os.fork()`` of a per-version server
(``forkserver.py``) that has imported jax/torch/orbax/maxtext once: ~16 s less per uncached run, same outputs (the
parity tests compare them bit for bit). A server that cannot take a run makes that run a plain subprocess, with a
ForkServerWarning. The default (the benchmark, scripts/maxtext_reference.py) is the plain subprocess, which
measures MaxText's own import time and memory.

Main API::

    ref = MaxTextReference(cache_dir)               # or MaxTextReference() for the default
    ref.scanned(model, src_dir=None)    -> Path     # <...>/0/items (llama_or_mistral_ckpt)
    ref.scanned_hf(model, hf_dir)       -> Path     # the same from HF safetensors (--huggingface-checkpoint true)
    ref.to_maxtext(hf_dir, name, scanned=…) -> Path # 0.2.5's to_maxtext.py on HF files (Qwen3), <...>/0/items
    ref.model_configs(prefix)           -> dict     # MaxText's HF configs + model ymls of the names with a prefix
    ref.logits_hf(hf_dir, name, path, kind) -> np.ndarray  # 0.2.5 MaxEngine logits of an HF-sourced model (Qwen3)
    ref.unscanned(model, src_dir=None)  -> Path     # <...>/checkpoints/0/items (generate_param_only_checkpoint)
    ref.quantized(model, src_dir=None, quant="int8") -> Path   # save_quantized_params_path dir
    ref.to_huggingface(model, items, scanned=…) -> Path  # 0.2.5's to_huggingface.py output dir (to_hf.py)
    ref.train(model, steps=2)           -> Path     # 0.2.5's trainer: the last step's items (train.py)
                                                   # (0.2.4: load_and_quantize_checkpoint; 0.2.5: layerwise_quantization)
    ref.with_maxtext("0.2.5")           -> MaxTextReference   # same cache, the other version
    ref.load_check(model, path, kind)   -> dict     # MaxEngine.load_params summary; raises if MaxText can't restore
    ref.logits(model, path, kind)       -> np.ndarray [n_tokens, vocab] float32
    read_leaves(path) -> {"params/params/...": np.ndarray}   # every stored array, stored dtype
    read_metadata(path) -> dict (parsed _METADATA);  metadata_tree(path) -> {"a/b/c": value_metadata}

``model`` is a :class:`rayconv.synthetic.SyntheticModel` (or a dict of its fields). ``src_dir`` may be a
checkpoint already written with ``write_checkpoint(model, ...)``; if omitted the harness writes (and caches)
one itself. ``kind`` is one of ``scanned, unscanned, int8, int8w, int4w``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ast
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

#: The MaxText scripts sit next to this module, two levels under the repo (their ``bootstrap`` relies on that depth).
REPO = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = Path(__file__).resolve().parent

KINDS = ("scanned", "unscanned", "int8", "int8w", "int4w")
QUANT_KINDS = ("int8", "int8w", "int4w")
DEFAULT_TOKENS = (1, 7, 42, 3, 99, 250, 17, 5)

#: Bump to invalidate every cached entry (the script sources are hashed in as well).
HARNESS_VERSION = "1"

#: maxtext version -> (env var of its --no-deps --target dir, the code path the scripts drive).
MAXTEXT_VERSIONS = {"0.2.4": ("RAYCONV_MAXTEXT_PATH", "linen"), "0.2.5": ("RAYCONV_MAXTEXT_025_PATH", "nnx")}


class ReferenceError(RuntimeError):
    """A MaxText reference script failed. The message carries the command and the tail of its output."""


class ReferenceUnsupported(ReferenceError):
    """MaxText's scripts cannot produce this model/layout (e.g. kv step != 2, llama-3 with MP > kv heads)."""


class ReferenceEnvMissing(ReferenceError):
    """The reference env (python or maxtext dir) is not installed."""


# --------------------------------------------------------------------------------------------------
# Environment


def ref_python() -> Path:
    return Path(os.environ.get("RAYCONV_REF_PYTHON") or REPO / ".venvs" / "ref" / "bin" / "python")


def maxtext_path(version: str = "0.2.4") -> Path:
    var, _ = MAXTEXT_VERSIONS[version]
    return Path(os.environ.get(var) or REPO / ".venvs" / f"maxtext-{version}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYCONV_REF_CACHE") or REPO / ".cache" / "maxtext-ref")


def maxtext_version(version: str = "0.2.4") -> str:
    infos = sorted(p.name for p in maxtext_path(version).glob("maxtext-*.dist-info"))
    return infos[-1] if infos else "unknown"


def available(version: str = "0.2.4") -> tuple[bool, str]:
    """(True, "") if the reference env looks usable, else (False, why) (the tests fail, never skip, when it is not)."""
    py, mt = ref_python(), maxtext_path(version)
    var, _ = MAXTEXT_VERSIONS[version]
    if not py.exists():
        return False, f"reference python {py} not found (set RAYCONV_REF_PYTHON)"
    if not (mt / "maxtext" / "checkpoint_conversion").is_dir():
        return False, f"maxtext {version} not found under {mt} (set {var}; scripts/setup.sh --reference installs it)"
    if not (mt / f"maxtext-{version}.dist-info").is_dir():
        return False, f"{mt} does not hold maxtext {version} (found {maxtext_version(version)})"
    return True, ""


def child_env(version: str = "0.2.4") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "PYTHONHOME")}
    env.update(
        PYTHONPATH=str(maxtext_path(version)),
        RAYCONV_MAXTEXT_PATH=str(maxtext_path(version)),
        RAYCONV_MAXTEXT_LAYOUT=MAXTEXT_VERSIONS[version][1],
        DECOUPLE_GCLOUD="TRUE",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    return env


# --------------------------------------------------------------------------------------------------
# Model spec and hashing


def model_spec(model: Any) -> dict:
    """JSON-able dict the ref scripts take: the SyntheticModel fields plus head_dim and ffn_dim."""
    if isinstance(model, Mapping):
        spec = dict(model)
        if "head_dim" not in spec or "ffn_dim" not in spec:
            from rayconv.synthetic import SyntheticModel

            m = SyntheticModel(**{k: v for k, v in spec.items() if k not in ("head_dim", "ffn_dim")})
            spec.update(head_dim=m.head_dim, ffn_dim=m.ffn_dim)
        return spec
    spec = dataclasses.asdict(model)
    for late in ("fp8", "zero_channel"):  # added later: left out when false so cached entries keep their keys
        if not spec.get(late):
            spec.pop(late, None)
    spec.update(head_dim=model.head_dim, ffn_dim=model.ffn_dim)
    return spec


def _ref_common():
    """tools/maxtext_ref/_common.py imported in THIS env (it has no heavy module-level imports)."""
    import importlib.util

    mod = sys.modules.get("_rayconv_maxtext_ref_common")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_rayconv_maxtext_ref_common", SCRIPTS_DIR / "_common.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["_rayconv_maxtext_ref_common"] = mod
    return mod


def maxtext_model_name(model: Any) -> str:
    """The MaxText model name the harness registers the synthetic dims under (see _common.model_name);
    raises ReferenceUnsupported when MaxText's scripts cannot convert this layout."""
    common = _ref_common()
    try:
        return common.model_name(model_spec(model))
    except common.Unsupported as e:
        raise ReferenceUnsupported(str(e)) from None


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _code_of(source: bytes) -> str:
    """What a script *does*: its syntax tree without comments (ast drops them) and without docstrings, so rewording
    a comment or a docstring keeps every cached run valid while any change to the code invalidates it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def script_hash(*names: str) -> str:
    digest = hashlib.sha256()
    for name in ("_common.py",) + names:
        digest.update(name.encode())
        digest.update(_code_of((SCRIPTS_DIR / name).read_bytes()).encode())
    return digest.hexdigest()


def path_fingerprint(path: str | Path, full_limit: int = 256 << 20) -> str:
    """Content hash of a checkpoint directory (or file): file names + bytes; for trees larger than
    ``full_limit`` bytes, names + sizes + mtimes instead."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    digest = hashlib.sha256(str(total).encode())
    for p in files:
        st = p.stat()
        digest.update(str(p.relative_to(root) if p != root else p.name).encode() + b"\0")
        if total <= full_limit:
            digest.update(p.read_bytes())
        else:
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading Orbax checkpoints in the main env (tensorstore; OCDBT or plain, zarr3 or zarr2)


def read_metadata(path: str | Path) -> dict:
    """The parsed ``_METADATA`` of an Orbax PyTree checkpoint dir (``.../0/items`` or a quantized dir)."""
    return json.loads((Path(path) / "_METADATA").read_text())


def _meta_keys(entry: dict, fallback: str) -> tuple[str, ...]:
    if "key_metadata" in entry:
        return tuple(str(k["key"]) for k in entry["key_metadata"])
    import ast

    return tuple(str(k) for k in ast.literal_eval(fallback))


def metadata_tree(path: str | Path) -> dict[str, dict]:
    """{'/'-joined tree path: value_metadata} for every entry of ``_METADATA`` (arrays, scalars, empty
    Dict/List and None placeholders), e.g. ``{'params/params/decoder/decoder_norm/scale':
    {'value_type': 'jax.Array', 'skip_deserialize': False, 'write_shape': [256]}, 'step': {...}}``."""
    meta = read_metadata(path)
    return {
        "/".join(_meta_keys(entry, key)): entry.get("value_metadata", {})
        for key, entry in meta["tree_metadata"].items()
    }


_ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")


def _open_leaf(root: Path, name: str, meta: dict, context):
    import tensorstore as ts

    base = "file://" + str(root.resolve()) + "/"
    if meta.get("use_ocdbt", True):
        kvstore = {"driver": "ocdbt", "base": base, "path": name + "/"}
    else:
        kvstore = {"driver": "file", "path": str(root.resolve() / name) + "/"}
    driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"
    return ts.open({"driver": driver, "kvstore": kvstore}, context=context, open=True, read=True).result()


def read_leaves(path: str | Path, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Every stored array/scalar leaf of an Orbax checkpoint as numpy with its STORED dtype
    (bf16 -> ml_dtypes.bfloat16, int8, int4 -> ml_dtypes.int4, ...), keyed by '/'-joined tree path,
    e.g. ``params/params/decoder/layers/self_attention/query/kernel`` or ``step``.
    ``prefix`` keeps only paths starting with it. Placeholders (empty dicts, None, lists) are skipped."""
    import tensorstore as ts

    root = Path(path)
    meta = read_metadata(root)
    context = ts.Context()
    out: dict[str, np.ndarray] = {}
    for key, entry in meta["tree_metadata"].items():
        vm = entry.get("value_metadata", {})
        if vm.get("value_type") not in _ARRAY_TYPES or vm.get("skip_deserialize"):
            continue
        keys = _meta_keys(entry, key)
        joined = "/".join(keys)
        if prefix and not joined.startswith(prefix):
            continue
        store = _open_leaf(root, ".".join(keys), meta, context)
        out[joined] = np.asarray(store.read().result())
    return out


def leaf_checksum(arr: np.ndarray) -> str:
    """sha256 of the native bytes, as reported per leaf by ``load_check`` (ref env)."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def leaves_summary(path: str | Path, prefix: str | None = "params/") -> dict[str, dict]:
    """{path: {shape, dtype, sha256}} of the stored leaves under ``prefix`` (comparable with load_check; NNX trees
    have no ``params/`` root: pass ``prefix=None``)."""
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": leaf_checksum(v)}
        for k, v in read_leaves(path, prefix=prefix).items()
    }


def content_fingerprint(path: str | Path) -> str:
    """Hash of what a checkpoint holds (its tree metadata and every stored leaf's bytes), not of its files: two
    writes of the same tree (fresh OCDBT file names, commit markers naming their directory) hash the same."""
    return _sha({"tree": metadata_tree(path), "leaves": leaves_summary(path, prefix=None)})


# --------------------------------------------------------------------------------------------------
# The harness


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Fork server client (tools/maxtext_ref/forkserver.py runs in the reference env)


class ForkServerWarning(UserWarning):
    """The fork server could not take a run; it ran as a plain subprocess instead (same result, ~16 s slower)."""


class ForkServerUnavailable(RuntimeError):
    """The fork server cannot take a run (did not start, exited, broken pipe) and no child was started."""


class ForkServerDied(RuntimeError):
    """The fork server exited while a run's child was running (the child dies with it: PR_SET_PDEATHSIG)."""


#: After this many server failures an instance stops starting servers (a broken server must not double every run).
FORK_SERVER_MAX_FAILURES = 2
#: Seconds a server may take to import everything (~16 s measured; generous for a loaded 2-core machine).
FORK_SERVER_READY_TIMEOUT = 600.0
#: Seconds the client waits beyond a run's timeout for the server's reply (the server enforces the timeout itself).
FORK_SERVER_GRACE = 60.0

#: Scripts that always run as a plain subprocess: to_hf.py's forked child died of SIGSEGV within 0.4 s, before any
#: output (importing maxtext.checkpoint_conversion.to_huggingface after the fork), while the same run as a plain
#: subprocess succeeds; train.py imports the trainer's modules, which the server never preloads, likewise untested
#: forked.
PLAIN_SCRIPTS = frozenset({"to_hf.py", "to_hf_hf.py", "train.py"})

#: Env vars that can matter while the server imports jax/torch/maxtext: if any changes, the server restarts.
_IMPORT_ENV_PREFIXES = ("JAX_", "XLA_", "TF_", "PYTHON", "LD_", "CUDA", "TPU_", "OMP_", "MKL_", "TORCH",
                        "DECOUPLE_", "RAYCONV_MAXTEXT", "HOME", "TMPDIR")


def _import_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_ENV_PREFIXES)}


class ForkServer:
    """Client of one pre-imported reference-env process (``forkserver.py``) for one maxtext version.

    Each run is an ``os.fork()`` of the server with the request's env, cwd, argv and output files, so the scripts
    start with jax/torch/orbax/maxtext already imported (~16 s saved per run) and run unchanged. The server
    enforces the timeout itself (it kills its own unreaped child, so the pid cannot have been reused) and exits
    when its stdin closes, i.e. with the process that started it. ``maxrss_kb`` is the forked child's peak RSS:
    it counts the inherited anonymous pages (the imported modules' heap) but not the server's file-backed pages
    (shared libraries) until the child touches them, so it is LOWER than a plain run's (measured on the tiny
    scanned.py run: 904 MB forked vs 1680 MB plain). Use the plain subprocess for memory figures.
    """

    def __init__(self, env: dict[str, str], log_path: Path, ready_timeout: float = FORK_SERVER_READY_TIMEOUT):
        self.env = dict(env)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._cwd = tempfile.mkdtemp(prefix="maxtext-ref-forkserver-")
        self._buf = b""
        self.last_pid: int | None = None  # the last run's child (the tests check that a timeout killed it)
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen([str(ref_python()), str(SCRIPTS_DIR / "forkserver.py")], cwd=self._cwd,
                                         env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        try:
            self.info = self._read(ready_timeout)
        except (ForkServerDied, TimeoutError) as e:
            self.close()
            raise ForkServerUnavailable(f"{e} (log: {log_path})") from None
        if not self.info.get("ready"):
            self.close()
            raise ForkServerUnavailable(f"{self.info.get('error')} (log: {log_path})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout: float) -> dict:
        """The server's next JSON line; ForkServerDied on EOF, TimeoutError after ``timeout`` s."""
        fd, deadline = self.proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no reply from the fork server in {timeout:.0f} s")
            data = os.read(fd, 65536)
            if not data:
                raise ForkServerDied(f"the fork server exited (rc {self.proc.wait()})")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, request: dict, timeout: float) -> tuple[int, int, bool]:
        """Run one request; (returncode, peak RSS KiB, timed out). ForkServerUnavailable if no child started."""
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self.last_pid = self._read(FORK_SERVER_GRACE)["pid"]
        except (OSError, ValueError, KeyError, ForkServerDied, TimeoutError) as e:
            raise ForkServerUnavailable(f"{type(e).__name__}: {e}") from None
        try:
            done = self._read(timeout + FORK_SERVER_GRACE)
        except TimeoutError:  # the server did not enforce the timeout: kill the run ourselves; report a timeout
            self._kill_child(pid)
            return -signal.SIGKILL, 0, True
        except BaseException:
            self._kill_child(pid)
            raise
        return int(done["rc"]), int(done["maxrss_kb"]), bool(done["timed_out"])

    def _kill_child(self, pid: int) -> None:
        """Kill a run's child (a process this harness started through its server), then the server."""
        if self.alive():  # the server has not reaped the child, so ``pid`` is still that child
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        """Close the server's stdin (it exits at EOF); kill it if it does not exit promptly."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdout.close()
        shutil.rmtree(self._cwd, ignore_errors=True)


class RunOutcome(NamedTuple):
    returncode: int
    maxrss_kb: int  # ru_maxrss of the run's process (a forked child: see ForkServer)
    timed_out: bool
    via: str  # "subprocess" or "forkserver"
    seconds: float  # wall time of the run itself (not a fork server's start)


@dataclasses.dataclass
class RunRecord:
    script: str
    seconds: float  # wall time of the build (0 when served from the cache)
    cached: bool
    entry: str
    max_rss_mb: float | None = None  # peak RSS of the MaxText child process


class MaxTextReference:
    """Runs one MaxText version's own converters/loaders in the reference env, with an on-disk cache."""

    def __init__(self, cache_dir: str | Path | None = None, *, maxtext: str = "0.2.4", timeout: float = 1200,
                 serialize: bool = True, fork_server: bool = False):
        if maxtext not in MAXTEXT_VERSIONS:
            raise ValueError(f"maxtext must be one of {sorted(MAXTEXT_VERSIONS)}")
        self.maxtext = maxtext
        self.layout = MAXTEXT_VERSIONS[maxtext][1]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.serialize = serialize
        self.runs: list[RunRecord] = []
        self.last_run: dict | None = None
        # Opt-in (the tests): run scripts forked from a pre-imported server (see ForkServer). Off for the
        # benchmark, which must measure MaxText's own import time and memory.
        self.fork_server = fork_server
        self._fork: ForkServer | None = None
        self._fork_failures = 0
        self._fork_lock = threading.Lock()

    # ---------------------------------------------------------------- plumbing
    def with_maxtext(self, version: str) -> "MaxTextReference":
        """The same harness (cache, run log) driving another MaxText version."""
        other = MaxTextReference(self.cache_dir, maxtext=version, timeout=self.timeout, serialize=self.serialize,
                                 fork_server=self.fork_server)
        other.runs = self.runs
        return other

    def check_available(self) -> None:
        ok, why = available(self.maxtext)
        if not ok:
            raise ReferenceEnvMissing(why)

    def _entry(self, kind: str, key_obj: Any) -> Path:
        # The version is in both the key and the name: 0.2.4 and 0.2.5 entries never collide.
        key = _sha({"harness": HARNESS_VERSION, "maxtext": maxtext_version(self.maxtext), **key_obj})[:20]
        suffix = "" if self.maxtext == "0.2.4" else f"-{self.maxtext}"
        return self.cache_dir / f"{kind}{suffix}-{key}"

    def _cached(self, entry: Path, build, script: str) -> Path:
        """Return ``entry`` once it holds a complete result; ``build(tmp_dir)`` fills a fresh dir."""
        done = entry / "DONE"
        if done.exists():
            self.runs.append(RunRecord(script, 0.0, True, entry.name))
            return entry
        with _flock(self.cache_dir / "locks" / f"{entry.name}.lock"):
            if done.exists():
                self.runs.append(RunRecord(script, 0.0, True, entry.name))
                return entry
            tmp = self.cache_dir / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                t0 = time.time()
                self.last_run = None
                build(tmp)
                seconds = time.time() - t0
                rss = (self.last_run or {}).get("max_rss_mb")
                (tmp / "DONE").write_text(
                    json.dumps({"seconds": round(seconds, 2), "max_rss_mb": rss, "created": time.time()})
                )
                if entry.exists():
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            self.runs.append(RunRecord(script, seconds, False, entry.name, rss))
            return entry

    def _run(self, script: str, args: list[str], log_dir: Path) -> str:
        """Run a ref script; return its stdout. Raises ReferenceError (or ReferenceUnsupported for exit 3).
        Wall time and the child's peak RSS go to ``self.last_run`` and ``<cache>/logs/<entry>/``."""
        self.check_available()
        cmd = [str(ref_python()), str(SCRIPTS_DIR / script), *map(str, args)]
        # Keep the logs outside the (deleted-on-failure) temp entry dir: <cache>/logs/<entry>/.
        name = log_dir.name
        if name.startswith(".tmp-"):
            name = name[len(".tmp-") :].rsplit("-", 1)[0]
        log_dir = self.cache_dir / "logs" / name
        log_dir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = log_dir / f"{script}.stdout.log", log_dir / f"{script}.stderr.log"
        lock = _flock(self.cache_dir / "locks" / "maxtext-run.lock") if self.serialize else contextlib.nullcontext()
        with (
            lock,
            tempfile.TemporaryDirectory(prefix="maxtext-ref-cwd-") as cwd,
            open(out_path, "w") as out_f,
            open(err_path, "w") as err_f,
        ):
            env = child_env(self.maxtext)
            forked = self.fork_server and script not in PLAIN_SCRIPTS
            outcome = self._run_forked(cmd, Path(cwd), out_path, err_path, env) if forked else None
            if outcome is None:
                outcome = self._run_subprocess(cmd, Path(cwd), out_f, err_f, env)
            returncode, maxrss_kb, timed_out, via, seconds = outcome
        rss_mb = maxrss_kb / 1024  # KiB on Linux
        self.last_run = {"script": script, "seconds": round(seconds, 2), "max_rss_mb": round(rss_mb, 1), "via": via}
        (log_dir / f"{script}.run.json").write_text(json.dumps({**self.last_run, "cmd": cmd, "rc": returncode}))
        stdout, stderr = out_path.read_text(), err_path.read_text()
        if timed_out:
            raise ReferenceError(f"{script} timed out after {self.timeout} s\n$ {' '.join(cmd)}\nlogs in {log_dir}")
        if returncode != 0:
            lines = stderr.strip().splitlines() or stdout.strip().splitlines()
            unsupported = [ln for ln in lines if ln.startswith("UNSUPPORTED:")]
            if returncode == 3 and unsupported:
                raise ReferenceUnsupported(unsupported[-1][len("UNSUPPORTED: ") :])
            failed = [ln for ln in lines if ln.startswith("REF_FAILED:")]
            # The script's own problem list ("MaxText could not restore ...") comes before REF_FAILED.
            detail = [ln for ln in lines if ln.startswith(("MaxText could not restore", "  - "))][:40]
            tail = "\n".join(lines[-40:])
            raise ReferenceError(
                f"MaxText reference script {script} failed (exit {returncode}, {seconds:.1f} s): "
                f"{failed[-1][len('REF_FAILED: ') :] if failed else 'no REF_FAILED line'}\n"
                + ("\n".join(detail) + "\n" if detail else "")
                + f"$ {' '.join(cmd)}\n--- stderr tail (full logs in {log_dir}) ---\n{tail}"
            )
        return stdout

    def _run_subprocess(self, cmd: list[str], cwd: Path, out_f, err_f, env: dict[str, str]) -> RunOutcome:
        """A fresh ``python script`` process."""
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out_f, stderr=err_f, text=True)
        timer = threading.Timer(self.timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.time() - t0
        timed_out = seconds >= self.timeout and proc.returncode < 0
        return RunOutcome(proc.returncode, usage.ru_maxrss, timed_out, "subprocess", seconds)

    def _run_forked(self, cmd: list[str], cwd: Path, out_path: Path, err_path: Path,
                    env: dict[str, str]) -> RunOutcome | None:
        """The same run forked from this version's pre-imported server, or None (after a warning) when the server
        cannot take it: then the caller runs the plain subprocess. A server that dies DURING a run raises (the
        half-written outputs would not be a clean start for a rerun)."""
        if not self._fork_lock.acquire(blocking=False):  # serialize=False callers: the busy server runs one at a time
            return None
        try:
            server = self._fork_server_for(env)
            if server is None:
                return None
            request = {"script": cmd[1], "argv": cmd[2:], "cwd": str(cwd), "stdout": str(out_path),
                       "stderr": str(err_path), "env": env, "timeout": self.timeout}
            t0 = time.time()  # after the server's start: a run's seconds are its own, as with a plain subprocess
            try:
                rc, maxrss_kb, timed_out = server.run(request, self.timeout)
            except ForkServerUnavailable as e:
                self._fork_server_failed(f"fork server could not start {Path(cmd[1]).name}: {e}")
                return None
            except ForkServerDied as e:
                self._drop_fork_server()
                raise ReferenceError(f"MaxText fork server died during {Path(cmd[1]).name}: {e}\n"
                                     f"logs in {out_path.parent}") from None
            except BaseException:
                self._drop_fork_server()
                raise
            return RunOutcome(rc, maxrss_kb, timed_out, "forkserver", time.time() - t0)
        finally:
            self._fork_lock.release()

    def _fork_server_for(self, env: dict[str, str]) -> "ForkServer | None":
        """This instance's live server (started on first use, restarted when the env it imported under changed)."""
        if self._fork_failures >= FORK_SERVER_MAX_FAILURES:
            return None
        server = self._fork
        if server is not None and not server.alive():  # this run falls back; the next one starts a new server
            self._fork_server_failed(f"fork server for maxtext {self.maxtext} exited (rc {server.proc.poll()})")
            return None
        if server is not None and _import_env(server.env) != _import_env(env):
            self._drop_fork_server()  # it imported under another env (JAX_*, XLA_*, ...): start a fresh one
            server = None
        if server is None:
            try:
                server = ForkServer(env, self.cache_dir / "logs" / f"forkserver-{self.maxtext}.log")
            except ForkServerUnavailable as e:
                self._fork_server_failed(f"fork server for maxtext {self.maxtext} did not start: {e}")
                return None
            self._fork = server
        return server

    def _fork_server_failed(self, why: str) -> None:
        self._fork_failures += 1
        self._drop_fork_server()
        more = "" if self._fork_failures < FORK_SERVER_MAX_FAILURES else "; fork server disabled for this harness"
        warnings.warn(f"{why}; running MaxText as a plain subprocess{more}", ForkServerWarning, stacklevel=4)

    def _drop_fork_server(self) -> None:
        server, self._fork = self._fork, None
        if server is not None:
            server.close()

    def close(self) -> None:
        """Stop this instance's fork server (if any); later runs would start a new one."""
        self._drop_fork_server()

    def _model_file(self, entry_tmp: Path, spec: dict) -> Path:
        p = entry_tmp / "model.json"
        p.write_text(json.dumps(spec, sort_keys=True))
        return p

    # ---------------------------------------------------------------- synthetic source
    def source(self, model: Any) -> Path:
        """A cached Meta-format synthetic checkpoint for ``model`` (written in the main env)."""
        spec = model_spec(model)

        def build(tmp: Path) -> None:
            from rayconv.synthetic import SyntheticModel, write_checkpoint

            m = (
                model
                if not isinstance(model, Mapping)
                else SyntheticModel(**{k: v for k, v in spec.items() if k not in ("head_dim", "ffn_dim")})
            )
            write_checkpoint(m, tmp / "src")

        return self._cached(self._entry("src", {"model": spec}), build, "write_checkpoint") / "src"

    def _src(self, model: Any, src_dir: str | Path | None) -> Path:
        if src_dir is None:
            return self.source(model)
        src = Path(src_dir)
        want = model_spec(model)
        got = json.loads((src / "params.json").read_text())
        from rayconv.synthetic import SyntheticModel

        m = (
            model
            if not isinstance(model, Mapping)
            else SyntheticModel(**{k: v for k, v in want.items() if k not in ("head_dim", "ffn_dim")})
        )
        if got != json.loads(json.dumps(m.params_json())):
            raise ValueError(f"{src}/params.json does not match the model: {got} != {m.params_json()}")
        return src

    # ---------------------------------------------------------------- converters
    def scanned(self, model: Any, src_dir: str | Path | None = None) -> Path:
        """MaxText's llama_or_mistral_ckpt output for ``model``; returns ``<entry>/out/0/items``."""
        spec = model_spec(model)
        maxtext_model_name(spec)  # fail fast (no 10 s MaxText import) for layouts MaxText can't convert
        src = self._src(model, src_dir)
        entry = self._entry("scanned", {"model": spec, "scripts": script_hash("scanned.py")})

        def build(tmp: Path) -> None:
            out = self._run(
                "scanned.py", ["--model", self._model_file(tmp, spec), "--src", src, "--out", tmp / "out"], tmp
            )
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "scanned.py") / "out" / "0" / "items"

    def scanned_hf(self, model: Any, hf_dir: str | Path) -> Path:
        """llama_or_mistral_ckpt ``--huggingface-checkpoint true`` on the HF safetensors in ``hf_dir`` holding
        ``model``'s weights; returns ``<entry>/out/0/items``. HF files are unsharded, so the MaxText model name
        is the family's single-shard one (its HF route only looks at the name's family prefix)."""
        spec = dict(model_spec(model), n_shards=1)
        maxtext_model_name(spec)
        hf_dir = Path(hf_dir).resolve()
        entry = self._entry("scanned-hf", {"model": spec, "src": path_fingerprint(hf_dir),
                                            "scripts": script_hash("scanned_hf.py")})

        def build(tmp: Path) -> None:
            out = self._run("scanned_hf.py", ["--model", self._model_file(tmp, spec), "--src", hf_dir, "--out",
                                              tmp / "out"], tmp)
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "scanned_hf.py") / "out" / "0" / "items"

    def to_maxtext(self, hf_dir: str | Path, model_name: str, *, scanned: bool) -> Path:
        """MaxText 0.2.5's ``checkpoint_conversion/to_maxtext.py`` (default flags) on the HF checkpoint in ``hf_dir``,
        its ``config.json`` registered as ``model_name``'s HF config and its dims passed as overrides
        (to_maxtext_hf.py); returns ``<entry>/out/0/items``. Any family to_maxtext maps (Qwen3 dense and MoE)."""
        if self.maxtext != "0.2.5":
            raise ValueError("to_maxtext.py is MaxText 0.2.5's tool: use with_maxtext('0.2.5')")
        hf_dir = Path(hf_dir).resolve()
        scan = "true" if scanned else "false"
        entry = self._entry("to-maxtext", {"name": model_name, "scan": scan, "src": path_fingerprint(hf_dir),
                                           "scripts": script_hash("to_maxtext_hf.py")})

        def build(tmp: Path) -> None:
            out = self._run("to_maxtext_hf.py", ["--src", hf_dir, "--name", model_name, "--scan", scan,
                                                 "--out", tmp / "out"], tmp)
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "to_maxtext_hf.py") / "out" / "0" / "items"

    def logits_hf(self, hf_dir: str | Path, model_name: str, path: str | Path, kind: str,
                  tokens: tuple[int, ...] = DEFAULT_TOKENS) -> np.ndarray:
        """float32 prefill logits ``[len(tokens), vocab]`` from MaxText 0.2.5's MaxEngine for the checkpoint at
        ``path`` of the model in ``hf_dir`` (``model_name`` with config.json's dims, as ``to_maxtext`` registers it)."""
        if self.maxtext != "0.2.5" or kind not in ("scanned", "unscanned"):
            raise ValueError("logits_hf: MaxText 0.2.5, kind scanned or unscanned")
        hf_dir, path = Path(hf_dir).resolve(), Path(path).resolve()
        toks = ",".join(str(int(t)) for t in tokens)
        entry = self._entry("logits-hf", {"name": model_name, "kind": kind, "tokens": toks,
                                          "config": (hf_dir / "config.json").read_text(), "ckpt": path_fingerprint(path),
                                          "scripts": script_hash("logits_hf.py", "logits.py", "to_maxtext_hf.py")})

        def build(tmp: Path) -> None:
            self._run("logits_hf.py", ["--src", hf_dir, "--name", model_name, "--path", path, "--kind", kind,
                                       "--out", tmp / "logits.npy", "--tokens", toks], tmp)

        return np.load(self._cached(entry, build, "logits_hf.py") / "logits.npy")

    def model_configs(self, prefix: str) -> dict:
        """MaxText's own configs of its models named ``prefix…`` (model_configs.py): {name: {hf, yml, param_mapping,
        hf_ids}}, to check a family's size table against."""
        entry = self._entry("model-configs", {"prefix": prefix, "scripts": script_hash("model_configs.py")})

        def build(tmp: Path) -> None:
            self._run("model_configs.py", ["--prefix", prefix, "--out", tmp / "configs.json"], tmp)

        return json.loads((self._cached(entry, build, "model_configs.py") / "configs.json").read_text())

    def unscanned(self, model: Any, src_dir: str | Path | None = None) -> Path:
        """generate_param_only_checkpoint on the scanned reference; returns ``<entry>/out/unscanned/checkpoints/0/items``."""
        spec = model_spec(model)
        scanned = self.scanned(model, src_dir)
        entry = self._entry("unscanned", {"model": spec, "scripts": script_hash("scanned.py", "unscanned.py")})

        def build(tmp: Path) -> None:
            out = self._run(
                "unscanned.py",
                [
                    "--model",
                    self._model_file(tmp, spec),
                    "--scanned",
                    scanned,
                    "--out-base",
                    tmp / "out",
                    "--run-name",
                    "unscanned",
                ],
                tmp,
            )
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "unscanned.py") / "out" / "unscanned" / "checkpoints" / "0" / "items"

    def quantized(self, model: Any, src_dir: str | Path | None = None, quant: str = "int8") -> Path:
        """load_and_quantize_checkpoint on the unscanned reference; returns the save_quantized_params_path dir."""
        if quant not in QUANT_KINDS:
            raise ValueError(f"quant must be one of {QUANT_KINDS}")
        spec = model_spec(model)
        unscanned = self.unscanned(model, src_dir)
        entry = self._entry(
            quant, {"model": spec, "scripts": script_hash("scanned.py", "unscanned.py", "quantized.py")}
        )

        def build(tmp: Path) -> None:
            out = self._run(
                "quantized.py",
                [
                    "--model",
                    self._model_file(tmp, spec),
                    "--unscanned",
                    unscanned,
                    "--out",
                    tmp / "out",
                    "--quant",
                    quant,
                ],
                tmp,
            )
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "quantized.py") / "out"

    def reference(self, model: Any, kind: str, src_dir: str | Path | None = None) -> Path:
        """The reference checkpoint path of any kind (what MaxText's load_parameters_path takes)."""
        if kind == "scanned":
            return self.scanned(model, src_dir)
        if kind == "unscanned":
            return self.unscanned(model, src_dir)
        return self.quantized(model, src_dir, quant=kind)

    def train(self, model: Any, *, steps: int = 2, scanned: bool = True) -> Path:
        """maxtext 0.2.5's trainer (``maxtext.trainers.pre_train.train``, synthetic data, float32 weights) for
        ``steps`` steps with checkpointing on; returns the last step's ``items`` (params, opt_state, nnx_aux, step)."""
        if self.maxtext != "0.2.5":
            raise ValueError("train.py drives maxtext 0.2.5's trainer (use with_maxtext('0.2.5'))")
        spec = model_spec(model)
        entry = self._entry("train", {"model": spec, "steps": steps, "scanned": scanned,
                                      "scripts": script_hash("train.py")})

        def build(tmp: Path) -> None:
            out = self._run("train.py", ["--model", self._model_file(tmp, spec), "--out", tmp / "out", "--steps", steps,
                                         "--scan-layers", "true" if scanned else "false"], tmp)
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "train.py") / "out" / "train" / "checkpoints" / str(steps - 1) / "items"

    def to_huggingface(self, model: Any, items: str | Path, *, scanned: bool, max_shard_size: int | None = None) -> Path:
        """maxtext 0.2.5's ``to_huggingface.py`` on the checkpoint at ``items`` (tokenizer stubbed, architecture
        overridden by the synthetic dims, ``weight_dtype=bfloat16``); returns the directory of config.json and the
        safetensors files. ``max_shard_size`` replaces its 3 GiB split size (see to_hf.py)."""
        if self.maxtext != "0.2.5":
            raise ValueError("to_huggingface.py is maxtext 0.2.5's (use with_maxtext('0.2.5'))")
        spec = model_spec(model)
        items = Path(items).resolve()
        entry = self._entry("to-hf", {"model": spec, "ckpt": content_fingerprint(items), "scanned": scanned,
                                      "max_shard_size": max_shard_size, "scripts": script_hash("to_hf.py")})

        def build(tmp: Path) -> None:
            extra = [] if max_shard_size is None else ["--max-shard-size", max_shard_size]
            out = self._run("to_hf.py", ["--model", self._model_file(tmp, spec), "--items", items, "--scan-layers",
                                         "true" if scanned else "false", "--out", tmp / "out", *extra], tmp)
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "to_hf.py") / "out"

    def to_huggingface_hf(self, hf_dir: str | Path, model_name: str, items: str | Path, *, scanned: bool,
                          max_shard_size: int | None = None) -> Path:
        """maxtext 0.2.5's ``to_huggingface.py`` on a checkpoint of the HF-sourced model in ``hf_dir`` (Qwen3): its
        config.json registered as ``model_name``'s HF config, the dims as overrides, as ``to_maxtext`` registers it
        (to_hf_hf.py); returns the directory of config.json and the safetensors files."""
        if self.maxtext != "0.2.5":
            raise ValueError("to_huggingface.py is maxtext 0.2.5's (use with_maxtext('0.2.5'))")
        hf_dir, items = Path(hf_dir).resolve(), Path(items).resolve()
        entry = self._entry("to-hf-hf", {"name": model_name, "config": (hf_dir / "config.json").read_text(),
                                         "ckpt": content_fingerprint(items), "scanned": scanned,
                                         "max_shard_size": max_shard_size,
                                         "scripts": script_hash("to_hf_hf.py", "to_maxtext_hf.py")})

        def build(tmp: Path) -> None:
            extra = [] if max_shard_size is None else ["--max-shard-size", max_shard_size]
            out = self._run("to_hf_hf.py", ["--src", hf_dir, "--name", model_name, "--items", items, "--scan-layers",
                                            "true" if scanned else "false", "--out", tmp / "out", *extra], tmp)
            (tmp / "run.txt").write_text(out)

        return self._cached(entry, build, "to_hf_hf.py") / "out"

    # ---------------------------------------------------------------- MaxText loading
    def load_check(self, model: Any, path: str | Path, kind: str) -> dict:
        """Restore ``path`` with MaxText's serving loader (MaxEngine.load_params). Returns
        ``{"kind", "model_name", "path", "load_s", "leaves": {path: {shape, dtype, sha256, sum}}}``;
        raises ReferenceError if MaxText cannot restore it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        spec = model_spec(model)
        path = Path(path).resolve()
        entry = self._entry(
            "load",
            {"model": spec, "kind": kind, "ckpt": path_fingerprint(path), "scripts": script_hash("load_check.py")},
        )

        def build(tmp: Path) -> None:
            self._run(
                "load_check.py",
                ["--model", self._model_file(tmp, spec), "--path", path, "--kind", kind, "--out", tmp / "summary.json"],
                tmp,
            )

        return json.loads((self._cached(entry, build, "load_check.py") / "summary.json").read_text())

    def logits(self, model: Any, path: str | Path, kind: str, tokens: tuple[int, ...] = DEFAULT_TOKENS) -> np.ndarray:
        """float32 prefill logits ``[len(tokens), vocab]`` from MaxEngine for the checkpoint at ``path``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        spec = model_spec(model)
        path = Path(path).resolve()
        toks = ",".join(str(int(t)) for t in tokens)
        entry = self._entry(
            "logits",
            {
                "model": spec,
                "kind": kind,
                "tokens": toks,
                "ckpt": path_fingerprint(path),
                "scripts": script_hash("logits.py"),
            },
        )

        def build(tmp: Path) -> None:
            self._run(
                "logits.py",
                [
                    "--model",
                    self._model_file(tmp, spec),
                    "--path",
                    path,
                    "--kind",
                    kind,
                    "--out",
                    tmp / "logits.npy",
                    "--tokens",
                    toks,
                ],
                tmp,
            )

        return np.load(self._cached(entry, build, "logits.py") / "logits.npy")


def format_runs(runs: list[RunRecord]) -> str:
    def one(r: RunRecord) -> str:
        what = "cached" if r.cached else f"{r.seconds:6.1f} s" + (f" {r.max_rss_mb:7.0f} MB" if r.max_rss_mb else "")
        return f"{r.script:18s} {what}  {r.entry}"

    return "\n".join(one(r) for r in runs)


if __name__ == "__main__":  # pragma: no cover - manual smoke run
    sys.path.insert(0, str(REPO))
    from rayconv.synthetic import SyntheticModel

    ref = MaxTextReference()
    m = SyntheticModel()
    print(ref.scanned(m))
    print(format_runs(ref.runs))
