"""Meta consolidated.NN.pth -> MaxText scanned bf16 checkpoint, with MaxText's llama_or_mistral_ckpt
(0.2.4 or 0.2.5: the same tree; 0.2.5 saves it through Orbax's v1 Checkpointer).

Usage (reference env): python scanned.py --model '<json>' --src <meta dir> --out <dir>
Writes <out>/0/items. Mirrors the script's __main__: 16 simulated CPU devices, ocdbt + zarr3 on.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

# As the script's __main__ does, before jax is imported.
_common.bootstrap(device_count=16)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True, help="JSON (or a path to it) of the synthetic model")
  parser.add_argument("--src", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  model = _common.load_model(args.model)
  name = _common.model_name(model)

  t0 = time.time()
  import importlib  # pylint: disable=import-outside-toplevel

  mod = importlib.import_module("maxtext.checkpoint_conversion.standalone_scripts.llama_or_mistral_ckpt")
  t_import = time.time() - t0
  # Register the synthetic dims under the chosen (real) model name; only this process sees it.
  mod.MODEL_PARAMS_DICT[name] = {
      "num_layers": model["n_layers"],
      "num_heads": model["n_heads"],
      "num_kv_heads": model["n_kv_heads"],
      "dims_per_head": model["head_dim"],
      "vocab": model["vocab_size"],
  }
  t1 = time.time()
  mod.save_weights_to_checkpoint(
      args.out,
      mod.convert_to_jax_weights(args.src, name, False),
      mod.SIMULATED_CPU_DEVICES_COUNT,
      True,  # --use-ocdbt default
      True,  # --use-zarr3 default
  )
  items = os.path.join(args.out, "0", "items")
  if not os.path.isdir(items):
    raise SystemExit(f"MaxText wrote no {items}")
  print(
      f"REF_SCANNED model_name={name} maxtext={_common.check_version()} import_s={t_import:.1f} "
      f"convert_s={time.time() - t1:.1f} out={items}"
  )


if __name__ == "__main__":
  _common.run_main(main)
