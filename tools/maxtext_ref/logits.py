"""Prefill logits of a checkpoint with MaxText's MaxEngine (CPU; 0.2.4 classic Linen path, or 0.2.5 NNX defaults).

Usage (reference env): python logits.py --model '<json>' --path <ckpt> --kind scanned|unscanned|int8|int8w|int4w
                       --out logits.npy [--tokens 1,5,17,...]
Loads with MaxEngine.load_params (quantized kinds: AQT SERVE mode, checkpoint_is_quantized=True), pads the prompt
to max_prefill_predict_length (16) and runs the same model.apply call as MaxEngine._prefill_jit; saves the float32
logits of the real prompt positions, shape [len(tokens), vocab]. Also checks that MaxEngine.prefill's own
(last-position) logits equal the last row.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()

DEFAULT_TOKENS = "1,7,42,3,99,250,17,5"


def register_result_tokens_stub():
  """With DECOUPLE_GCLOUD=TRUE (JetStream is not installable) MaxText uses a plain-class stub for
  jetstream's ResultTokens, which jit cannot return; register it as a pytree like the real flax struct
  (arrays data/log_prob as children, index tuples static). Only touches the stub."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxtext.inference.maxengine import maxengine  # pylint: disable=import-outside-toplevel

  cls = maxengine.engine_api.ResultTokens
  if not getattr(maxengine.engine_api, "_IS_STUB", False) or getattr(cls, "_rayconv_registered", False):
    return
  static = ("tokens_idx", "valid_idx", "length_idx", "samples_per_slot")

  def flatten(rt):
    return (rt.data, rt.log_prob), tuple(getattr(rt, k) for k in static)

  def unflatten(aux, children):
    return cls(data=children[0], log_prob=children[1], **dict(zip(static, aux)))

  jax.tree_util.register_pytree_node(cls, flatten, unflatten)
  cls._rayconv_registered = True  # pylint: disable=protected-access


def nnx_full_logits(engine, config, n, length):
  """Exactly MaxText 0.2.5 MaxEngine._prefill_jit's model call (NNX: _nnx_run_model on an empty prefill cache),
  returning every position's logits."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax.core.spmd import logical_axis_rules  # pylint: disable=import-outside-toplevel
  from maxtext.common.common_types import DECODING_ACTIVE_SEQUENCE_INDICATOR, MODEL_MODE_PREFILL  # pylint: disable=import-outside-toplevel

  @jax.jit
  def full_logits(p, toks):
    input_tokens = jnp.expand_dims(toks, 0)
    positions = jnp.expand_dims(jnp.arange(0, length), 0)
    seg = jnp.expand_dims((jnp.arange(0, length) < n) * DECODING_ACTIVE_SEQUENCE_INDICATOR, 0)
    cache = engine._nnx_init_cache_dict(mode=MODEL_MODE_PREFILL)  # pylint: disable=protected-access
    with engine._mesh, logical_axis_rules(config.logical_axis_rules):  # pylint: disable=protected-access
      flat_logits, _ = engine._nnx_run_model(  # pylint: disable=protected-access
          params=p,
          cache_dict=cache,
          decoder_input_tokens=input_tokens,
          decoder_positions=positions,
          decoder_segment_ids=seg,
          enable_dropout=False,
          model_mode=MODEL_MODE_PREFILL,
          true_length=n,
      )
    return flat_logits

  return full_logits


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--path", required=True)
  parser.add_argument("--kind", required=True, choices=_common.CHECKPOINT_KINDS)
  parser.add_argument("--out", required=True)
  parser.add_argument("--tokens", default=DEFAULT_TOKENS)
  args = parser.parse_args()
  model = _common.load_model(args.model)
  tokens = [int(t) for t in args.tokens.split(",")]
  if not tokens or max(tokens) >= model["vocab_size"] or min(tokens) < 0:
    raise SystemExit(f"tokens must be in [0, {model['vocab_size']})")

  t0 = time.time()
  with tempfile.TemporaryDirectory(prefix="maxtext_ref_") as work:
    register_result_tokens_stub()
    engine, config, params = _common.load_engine(model, os.path.abspath(args.path), args.kind, work)
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flax.linen import partitioning as nn_partitioning  # pylint: disable=import-outside-toplevel
    from maxtext.common.common_types import DECODING_ACTIVE_SEQUENCE_INDICATOR, MODEL_MODE_PREFILL  # pylint: disable=import-outside-toplevel

    n, length = len(tokens), config.max_prefill_predict_length
    if n > length:
      raise SystemExit(f"at most {length} tokens")
    padded = jnp.array(tokens + [0] * (length - n), dtype=jnp.int32)

    # Exactly MaxEngine._prefill_jit's model call (no existing prefix), returning every position's logits.
    @jax.jit
    def full_logits(p, toks):
      input_tokens = jnp.expand_dims(toks, 0)
      positions = jnp.expand_dims(jnp.arange(0, length), 0)
      ones_to_keep = jnp.arange(0, length) < n
      seg = jnp.expand_dims(ones_to_keep * DECODING_ACTIVE_SEQUENCE_INDICATOR, 0)
      with engine._mesh, nn_partitioning.axis_rules(config.logical_axis_rules):  # pylint: disable=protected-access
        flat_logits, _ = engine.model.apply(
            p,
            input_tokens,
            positions,
            decoder_segment_ids=seg,
            enable_dropout=False,
            model_mode=MODEL_MODE_PREFILL,
            rngs={"params": jax.random.PRNGKey(0)},
            mutable=["cache"],
            true_length=n,
        )
      return flat_logits

    if _common.layout() == "nnx":
      full_logits = nnx_full_logits(engine, config, n, length)
    logits = np.asarray(full_logits(params, padded)[0, :n].astype(jnp.float32))
    prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=n, rng=jax.random.PRNGKey(0))
    last = np.asarray(prefix["logits"].astype(jnp.float32)).reshape(-1)
    if not np.array_equal(last, logits[-1]):
      diff = float(np.max(np.abs(last - logits[-1])))
      print(f"WARNING: MaxEngine.prefill last-position logits differ from the full model call by {diff}", file=sys.stderr)
  np.save(args.out, logits)
  print(
      f"REF_LOGITS kind={args.kind} shape={list(logits.shape)} dtype={logits.dtype} argmax_last={int(logits[-1].argmax())} "
      f"s={time.time() - t0:.1f} out={args.out}"
  )


if __name__ == "__main__":
  _common.run_main(main)
