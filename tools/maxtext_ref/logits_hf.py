"""Prefill logits of a checkpoint of an HF-sourced model (Qwen3) with MaxText 0.2.5's MaxEngine (CPU, default flags).

Usage (reference env, maxtext 0.2.5):
  python logits_hf.py --src <HF dir> --name <MaxText model name> --path <ckpt items> --kind scanned|unscanned
                      --out logits.npy [--tokens 1,5,17,...]
The model is MaxText's ``--name`` with the dims of ``<HF dir>/config.json`` as overrides (to_maxtext_hf.overrides:
the same model to_maxtext.py converted for); loading and the model call are logits.py's (MaxEngine.load_params, then
exactly MaxEngine._prefill_jit's call). Saves the float32 logits of the prompt positions, [len(tokens), vocab].
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position
import logits as llama_logits  # pylint: disable=wrong-import-position
import to_maxtext_hf  # pylint: disable=wrong-import-position

_common.bootstrap()  # last: to_maxtext_hf's import set 16 simulated devices; MaxEngine runs on one


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--src", required=True)
  parser.add_argument("--name", required=True)
  parser.add_argument("--path", required=True)
  parser.add_argument("--kind", required=True, choices=("scanned", "unscanned"))
  parser.add_argument("--out", required=True)
  parser.add_argument("--tokens", default=llama_logits.DEFAULT_TOKENS)
  args = parser.parse_args()
  with open(os.path.join(args.src, "config.json"), encoding="utf8") as f:
    config = json.load(f)
  tokens = [int(t) for t in args.tokens.split(",")]
  if not tokens or max(tokens) >= config["vocab_size"] or min(tokens) < 0:
    raise SystemExit(f"tokens must be in [0, {config['vocab_size']})")

  t0 = time.time()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from maxtext.configs import pyconfig  # pylint: disable=import-outside-toplevel
  from maxtext.inference.maxengine import maxengine  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory(prefix="maxtext_ref_") as work:
    llama_logits.register_result_tokens_stub()
    argv = [
        "maxtext_ref",
        os.path.join(_common.maxtext_root(), "configs", "base.yml"),
        f"model_name={args.name}",
        "override_model_config=true",
        *to_maxtext_hf.overrides(config),
        "skip_jax_distributed_system=true",
        "hardware=cpu",
        "async_checkpointing=false",
        "weight_dtype=bfloat16",
        "enable_checkpointing=true",
        f"scan_layers={'true' if args.kind == 'scanned' else 'false'}",
        f"load_parameters_path={os.path.abspath(args.path)}",
        f"base_output_directory={work}",
        "run_name=maxtext_ref",
        "attention=dot_product",
        *_common.ENGINE_LENGTHS,
    ]
    print("ARGV", " ".join(argv[1:]), flush=True)
    mt_config = pyconfig.initialize(argv)
    engine = maxengine.MaxEngine(mt_config)
    params = engine.load_params(rng=jax.random.PRNGKey(0))
    n, length = len(tokens), mt_config.max_prefill_predict_length
    if n > length:
      raise SystemExit(f"at most {length} tokens")
    padded = jnp.array(tokens + [0] * (length - n), dtype=jnp.int32)
    full_logits = llama_logits.nnx_full_logits(engine, mt_config, n, length)
    logits = np.asarray(full_logits(params, padded)[0, :n].astype(jnp.float32))
  np.save(args.out, logits)
  print(f"REF_LOGITS_HF name={args.name} kind={args.kind} shape={list(logits.shape)} "
        f"argmax_last={int(logits[-1].argmax())} s={time.time() - t0:.1f} out={args.out}")


if __name__ == "__main__":
  _common.run_main(main)
