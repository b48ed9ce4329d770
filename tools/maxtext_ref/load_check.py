"""Load a checkpoint with MaxText's own serving loader (0.2.4 classic, or 0.2.5 NNX with default flags) and print a
JSON summary of what it restored.

Usage (reference env): python load_check.py --model '<json>' --path <ckpt> --kind scanned|unscanned|int8|int8w|int4w
                       [--out summary.json] [--lenient]
``path`` is what MaxText's ``load_parameters_path`` takes: ``.../0/items`` for bf16 checkpoints, the directory
itself for quantized ones. Loader: ``MaxEngine(config).load_params()`` (Linen path), i.e.
``maxtext_utils.setup_decode_state`` -> ``checkpointing.load_params_from_path`` with the abstract state of the
model built from the config. Quantized kinds use ``quantization=int8`` (or ``intmp`` + the weight-only json) with
``checkpoint_is_quantized=True`` (AQT SERVE mode).

MaxText's own mismatch check (``_raise_on_weight_mismatch``) only covers plain weights: a missing AQT QTensor
comes back as an unmaterialised ShapeDtypeStruct and an int8 checkpoint loaded as bf16 yields placeholder
metadata instead of kernels, both without an error. So this script also checks, and exits 1 on, any of:
  * a restored leaf that is not a materialised array;
  * a restored leaf whose shape/dtype differs from the model's abstract target;
  * (unless --lenient) a stored array whose dtype/shape differs from the restored one (Orbax casts silently),
    or a stored array under ``params/`` that the model does not restore.

Exit 0 and a JSON document {"kind", "model_name", "path", "load_s", "leaves": {path: {shape, dtype, sha256, sum}},
"stored_only": [...]} on stdout after the marker line ``REF_LOAD_CHECK_JSON``; non-zero if MaxText cannot
restore the checkpoint.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()


def abstract_target(engine, config):
  """The abstract params MaxText restores into (as setup_decode_state computes them)."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxtext.utils import maxtext_utils  # pylint: disable=import-outside-toplevel

  init_state_fn = functools.partial(
      maxtext_utils.init_initial_state, engine.model, None, config, False, jax.random.PRNGKey(0)
  )
  abstract_state, _, _ = maxtext_utils.get_abstract_state(config, engine._mesh, init_state_fn, False)  # pylint: disable=protected-access
  return abstract_state.params


def nnx_restored(engine, params) -> dict:
  """{canonical path: array} of what MaxText 0.2.5's MaxEngine restored: the nnx.Param state it returns plus the
  AQT ``qrhs.frozen`` payloads it keeps in the engine's rest state (serve mode)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  restored = {_common.nnx_canonical(k): v for k, v in _common.flatten(nnx.to_pure_dict(params), prefix="").items()}
  rest = _common.flatten(nnx.to_pure_dict(engine._nnx_rest_state), prefix="")  # pylint: disable=protected-access
  restored.update({_common.nnx_canonical(k): v for k, v in rest.items() if "/qrhs/frozen/" in k})
  return restored


def main_nnx(args, model, path, stored):
  """0.2.5: every stored array restored with its stored shape and dtype, every model weight taken from disk."""
  t0 = time.time()
  problems = []
  by_canon = {_common.nnx_canonical(k): k for k in stored}
  with tempfile.TemporaryDirectory(prefix="maxtext_ref_") as work:
    engine, _, params = _common.load_engine(model, path, args.kind, work)
    restored = nnx_restored(engine, params)
    for canon in sorted(restored):
      leaf = restored[canon]
      if not _common.is_array(leaf):
        problems.append(f"{canon}: not restored (got {type(leaf).__name__})")
      elif canon not in by_canon:
        problems.append(f"{canon}: the model holds it but the checkpoint does not (left at its initial value)")
      elif not args.lenient:
        s_shape, s_dtype = stored[by_canon[canon]]
        if list(s_shape) != list(leaf.shape) or s_dtype != str(leaf.dtype):
          problems.append(f"{canon}: stored as {s_dtype}{s_shape}, restored as {leaf.dtype}{list(leaf.shape)}")
    stored_only = sorted(k for c, k in by_canon.items() if c not in restored)
    if stored_only and not args.lenient:
      problems += [f"{k}: stored but not restored by the model" for k in stored_only]
    if problems:
      print(f"MaxText could not restore {path} as {args.kind}:", file=sys.stderr)
      for p in problems[:200]:
        print(f"  - {p}", file=sys.stderr)
      raise SystemExit(1)
    leaves = {by_canon[c]: _common.leaf_summary(v) for c, v in sorted(restored.items())}
  if args.kind in _common.QUANT_KINDS and not any("/AqtDotGeneral_0/" in k for k in leaves):
    raise SystemExit("quantized load restored no AQT tensors")
  return {"kind": args.kind, "model_name": _common.model_name(model), "path": path, "stored_only": stored_only,
          "leaves": leaves, "load_s": round(time.time() - t0, 2)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--path", required=True)
  parser.add_argument("--kind", required=True, choices=_common.CHECKPOINT_KINDS)
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--lenient", action="store_true", help="don't fail on stored-vs-restored dtype/extra leaves")
  args = parser.parse_args()
  model = _common.load_model(args.model)
  path = os.path.abspath(args.path)
  if not os.path.exists(os.path.join(path, "_METADATA")):
    raise SystemExit(f"{path} has no _METADATA: not an Orbax PyTree checkpoint directory")
  stored = _common.stored_arrays(path)
  if _common.layout() == "nnx":
    summary = main_nnx(args, model, path, stored)
    if not summary["leaves"]:
      raise SystemExit("MaxText restored no arrays")
    text = json.dumps(summary, sort_keys=True)
    if args.out:
      with open(args.out, "w", encoding="utf8") as f:
        f.write(text)
    print("REF_LOAD_CHECK_JSON")
    print(text)
    return

  t0 = time.time()
  problems = []
  with tempfile.TemporaryDirectory(prefix="maxtext_ref_") as work:
    engine, config, params = _common.load_engine(model, path, args.kind, work)
    restored = _common.flatten(params)
    target = _common.flatten(abstract_target(engine, config))
    for k in sorted(set(target) - set(restored)):
      problems.append(f"{k}: model expects it, loader returned nothing")
    for k in sorted(restored):
      leaf = restored[k]
      if not _common.is_array(leaf):
        problems.append(f"{k}: not restored (got {type(leaf).__name__})")
        continue
      want = target.get(k)
      if want is None:
        problems.append(f"{k}: restored but not part of the model")
      elif tuple(want.shape) != tuple(leaf.shape) or want.dtype != leaf.dtype:
        problems.append(f"{k}: restored {leaf.dtype}{list(leaf.shape)}, model expects {want.dtype}{list(want.shape)}")
      if k in stored and not args.lenient:
        s_shape, s_dtype = stored[k]
        if list(s_shape) != list(leaf.shape) or s_dtype != str(leaf.dtype):
          problems.append(f"{k}: stored as {s_dtype}{s_shape}, restored as {leaf.dtype}{list(leaf.shape)}")
    stored_only = sorted(k for k in stored if k.startswith("params/") and k not in restored)
    if stored_only and not args.lenient:
      problems += [f"{k}: stored but not restored by the model" for k in stored_only]
    if problems:
      print(f"MaxText could not restore {path} as {args.kind}:", file=sys.stderr)
      for p in problems[:200]:
        print(f"  - {p}", file=sys.stderr)
      raise SystemExit(1)
    summary = {
        "kind": args.kind,
        "model_name": _common.model_name(model),
        "path": path,
        "stored_only": stored_only,
        "leaves": {k: _common.leaf_summary(v) for k, v in sorted(restored.items())},
    }
  if not summary["leaves"]:
    raise SystemExit("MaxText restored no arrays")
  if args.kind in _common.QUANT_KINDS and not any("/aqt/" in k for k in summary["leaves"]):
    raise SystemExit("quantized load restored no aqt tensors")
  summary["load_s"] = round(time.time() - t0, 2)
  text = json.dumps(summary, sort_keys=True)
  if args.out:
    with open(args.out, "w", encoding="utf8") as f:
      f.write(text)
  print("REF_LOAD_CHECK_JSON")
  print(text)


if __name__ == "__main__":
  _common.run_main(main)
