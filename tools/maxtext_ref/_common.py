"""Shared helpers for the scripts that run INSIDE the MaxText reference env (Python 3.12, maxtext 0.2.4 or 0.2.5).

These scripts are invoked as ``python tools/maxtext_ref/<script>.py --model '<json>' ...`` by
``tools/maxtext_ref/reference.py``. They must not import rayconv: the model is passed as a JSON dict with the
SyntheticModel fields plus the derived ``head_dim`` and ``ffn_dim``.

Environment: ``RAYCONV_MAXTEXT_PATH`` (the ``pip install --no-deps --target`` dir of the maxtext version to run)
is put first on sys.path; ``RAYCONV_MAXTEXT_LAYOUT`` says which code path to drive: ``linen`` (maxtext 0.2.4
with its three NNX switches off: the classic tree JetStream-MaxText loads) or ``nnx`` (maxtext 0.2.5 with default
flags; 0.2.5 has no Linen path and no such switches). ``DECOUPLE_GCLOUD=TRUE`` and ``JAX_PLATFORMS=cpu`` are forced.
"""

from __future__ import annotations

import json
import os
import sys

#: Bumped whenever a script's behaviour changes, so cached reference outputs are invalidated.
SCRIPT_VERSION = "1"

#: Classic (Linen) layout switches: maxtext 0.2.4 defaults to NNX, which writes a different tree.
CLASSIC = ["pure_nnx=false", "enable_nnx=false", "pure_nnx_decoder=false"]

QUANT_CFG = {"int8w": "int8_weight_only.json", "int4w": "int4_weight_only.json"}
QUANT_KINDS = ("int8", "int8w", "int4w")


def layout() -> str:
  """``linen`` (maxtext 0.2.4, classic flags) or ``nnx`` (maxtext 0.2.5, default flags)."""
  value = os.environ.get("RAYCONV_MAXTEXT_LAYOUT", "linen")
  if value not in ("linen", "nnx"):
    raise SystemExit(f"RAYCONV_MAXTEXT_LAYOUT must be linen or nnx, not {value!r}")
  return value


class Unsupported(Exception):
  """The MaxText reference cannot produce this layout (exit code 3)."""


def bootstrap(device_count: int | None = None) -> None:
  """Set env vars and sys.path before jax/maxtext are imported."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.environ.get("RAYCONV_MAXTEXT_PATH") or os.path.join(repo, ".venvs", "maxtext-0.2.4")
  os.environ["RAYCONV_MAXTEXT_PATH"] = path
  if os.path.isdir(path) and path not in sys.path:
    sys.path.insert(0, path)
  os.environ["DECOUPLE_GCLOUD"] = "TRUE"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if device_count is not None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
  else:
    os.environ.pop("XLA_FLAGS", None)


def maxtext_root() -> str:
  import maxtext  # pylint: disable=import-outside-toplevel

  return os.path.dirname(os.path.abspath(maxtext.__file__))


def check_version() -> str:
  from maxtext import version  # pylint: disable=import-outside-toplevel

  v = getattr(version, "__version__", None) or getattr(version, "VERSION", None) or "?"
  return str(v)


def load_model(text: str) -> dict:
  if os.path.exists(text):
    with open(text, encoding="utf8") as f:
      text = f.read()
  model = json.loads(text)
  for key in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_shards", "head_dim", "ffn_dim"):
    if key not in model:
      raise SystemExit(f"model json lacks {key!r}")
  return model


def model_name(model: dict) -> str:
  """MaxText model name whose hard-coded rules reproduce MaxText's real behaviour for this family/layout.

  In llama_or_mistral_ckpt 0.2.4:
    * token embedding concat axis 0 iff name[:6] in {llama3, llama4}; else axis 1 then [:vocab] (llama2/mistral);
    * rope permute (even/odd) iff name[:8] not in {llama3.1, llama3.3};
    * wk/wv taken from shards[::2] iff name == 'llama3.1-405b' (no other step exists).
  """
  family, mp, kv = model["family"], model["n_shards"], model["n_kv_heads"]
  names = {"llama-2": "llama2-7b", "llama-3": "llama3-8b", "llama-3.1": "llama3.1-8b", "llama-3.3": "llama3.3-70b"}
  if family not in names:
    raise Unsupported(f"unknown family {family!r}")
  if mp > kv:
    if family not in ("llama-3.1", "llama-3.3"):
      raise Unsupported(
          f"{family} with {mp} shards > {kv} kv heads: MaxText only de-duplicates repeated kv heads for "
          f"'llama3.1-405b', whose name also disables the rope permute that {family} needs"
      )
    if mp != 2 * kv:
      raise Unsupported(
          f"{mp} shards with {kv} kv heads needs kv step {mp // kv}; MaxText's llama_or_mistral_ckpt only "
          "supports step 2 (llama3.1-405b MP16)"
      )
    return "llama3.1-405b"
  return names[family]


def config_args(model: dict, *extra: str) -> list[str]:
  """argv for pyconfig.initialize: base.yml then key=value overrides giving the synthetic dims."""
  base_yml = os.path.join(maxtext_root(), "configs", "base.yml")
  args = [
      "maxtext_ref",
      base_yml,
      f"model_name={model_name(model)}",
      "override_model_config=true",
      f"base_emb_dim={model['dim']}",
      f"base_num_query_heads={model['n_heads']}",
      f"base_num_kv_heads={model['n_kv_heads']}",
      f"head_dim={model['head_dim']}",
      f"base_mlp_dim={model['ffn_dim']}",
      f"base_num_decoder_layers={model['n_layers']}",
      f"vocab_size={model['vocab_size']}",
      "skip_jax_distributed_system=true",
      "hardware=cpu",
      "async_checkpointing=false",
      "weight_dtype=bfloat16",
      "enable_checkpointing=true",
      *(CLASSIC if layout() == "linen" else []),
  ]
  return args + list(extra)


def quant_args(kind: str) -> list[str]:
  if kind == "int8":
    return ["quantization=int8"]
  if kind in QUANT_CFG:
    cfg = os.path.join(maxtext_root(), "configs", "quantization", QUANT_CFG[kind])
    return ["quantization=intmp", f"quant_cfg_path={cfg}"]
  raise SystemExit(f"unknown quantization kind {kind!r}")


def run_main(fn) -> None:
  """Run fn(). Exit codes: 0 ok, 3 Unsupported ("UNSUPPORTED: ..." on stderr), 1 anything else, with the
  traceback and a last "REF_FAILED: <type>: <message>" line on stderr. Exits with os._exit so Orbax/asyncio
  shutdown noise cannot bury the error."""
  import traceback  # pylint: disable=import-outside-toplevel

  code = 0
  try:
    fn()
  except Unsupported as e:
    print(f"UNSUPPORTED: {e}", file=sys.stderr)
    code = 3
  except SystemExit as e:
    if e.code not in (None, 0):
      print(f"REF_FAILED: {e.code}", file=sys.stderr)
      code = e.code if isinstance(e.code, int) else 1
  except BaseException as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"REF_FAILED: {type(e).__name__}: {first}", file=sys.stderr)
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


CHECKPOINT_KINDS = ("scanned", "unscanned") + QUANT_KINDS

#: Prefill/cache sizes for loading with MaxEngine (tiny models; the checkpoint does not depend on them).
ENGINE_LENGTHS = ["per_device_batch_size=1", "max_prefill_predict_length=16", "max_target_length=32"]


def engine_args(model: dict, path: str, kind: str, workdir: str) -> list[str]:
  """pyconfig argv for MaxEngine loading ``path`` as a checkpoint of ``kind``."""
  if kind not in CHECKPOINT_KINDS:
    raise SystemExit(f"unknown checkpoint kind {kind!r}; expected one of {CHECKPOINT_KINDS}")
  extra = [f"scan_layers={'true' if kind == 'scanned' else 'false'}"]
  if kind in QUANT_KINDS:
    extra += quant_args(kind) + ["checkpoint_is_quantized=true"]
  extra += [
      f"load_parameters_path={path}",
      f"base_output_directory={workdir}",
      "run_name=maxtext_ref",
      "attention=dot_product",
      *ENGINE_LENGTHS,
  ]
  return config_args(model, *extra)


def load_engine(model: dict, path: str, kind: str, workdir: str):
  """MaxEngine(config).load_params(): MaxText's serving loader (setup_decode_state -> load_params_from_path with
  the abstract state of the model built from the config; AQT SERVE mode for quantized kinds). Returns
  (engine, config, params)."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxtext.configs import pyconfig  # pylint: disable=import-outside-toplevel
  from maxtext.inference.maxengine import maxengine  # pylint: disable=import-outside-toplevel

  argv = engine_args(model, path, kind, workdir)
  print("ARGV", " ".join(argv[1:]), flush=True)
  config = pyconfig.initialize(argv)
  if layout() == "linen":
    assert not config.pure_nnx, "expected the classic (Linen) code path"
  engine = maxengine.MaxEngine(config)
  params = engine.load_params(rng=jax.random.PRNGKey(0))
  return engine, config, params


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree, prefix: str = "params") -> dict:
  """{'/'-joined path: leaf} over array leaves, paths as on disk (the restored tree is the on-disk 'params' item)."""
  import jax  # pylint: disable=import-outside-toplevel

  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    out["/".join(([prefix] if prefix else []) + [_key_str(k) for k in path])] = leaf
  return out


def nnx_canonical(path: str) -> str:
  """An NNX tree path without its Variable ``value`` wrappers: the on-disk ``…/kernel/value`` and
  ``…/qrhs/frozen/value/qvalue`` and a restored ``…/kernel`` (or a ``Partitioned`` box's ``…/qvalue/value``) all
  map to one key. A module named ``value`` (``self_attention/value``) is neither last nor after ``frozen``."""
  parts = path.split("/")
  keep = [p for i, p in enumerate(parts) if not (p == "value" and (i == len(parts) - 1 or parts[i - 1] == "frozen"))]
  return "/".join(keep)


def is_array(leaf) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  return isinstance(leaf, (jax.Array, np.ndarray)) and not isinstance(leaf, jax.ShapeDtypeStruct)


def leaf_summary(leaf) -> dict:
  """shape, dtype, sha256 of the native bytes (same as tools/maxtext_ref/reference.py leaf_checksum), sum."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  arr = np.ascontiguousarray(np.asarray(leaf))
  raw = arr.tobytes()  # native (little-endian) bytes; ml_dtypes int4 is one byte per element
  return {
      "shape": list(arr.shape),
      "dtype": str(arr.dtype),
      "sha256": hashlib.sha256(raw).hexdigest(),
      "sum": float(arr.astype(np.float64).sum()) if arr.size else 0.0,
  }


def stored_arrays(path: str) -> dict:
  """{'/'-joined tree path: (shape, dtype)} of the arrays actually stored in an Orbax PyTree checkpoint,
  from _METADATA + each array's zarr metadata (tensorstore, no data read)."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  with open(os.path.join(path, "_METADATA"), encoding="utf8") as f:
    meta = json.load(f)
  base = "file://" + os.path.abspath(path) + "/"
  context = ts.Context()
  out = {}
  for entry in meta["tree_metadata"].values():
    vm = entry.get("value_metadata", {})
    if vm.get("value_type") not in ("jax.Array", "np.ndarray", "scalar") or vm.get("skip_deserialize"):
      continue
    keys = [str(k["key"]) for k in entry["key_metadata"]]
    name = ".".join(keys)
    if meta.get("use_ocdbt", True):
      kvstore = {"driver": "ocdbt", "base": base, "path": name + "/"}
    else:
      kvstore = {"driver": "file", "path": os.path.join(os.path.abspath(path), name) + "/"}
    driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"
    store = ts.open({"driver": driver, "kvstore": kvstore}, context=context, open=True).result()
    out["/".join(keys)] = (list(store.shape), str(store.dtype.numpy_dtype))
  return out
