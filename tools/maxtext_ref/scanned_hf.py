"""HF safetensors -> MaxText scanned bf16 checkpoint, with MaxText's llama_or_mistral_ckpt --huggingface-checkpoint true.

Usage (reference env): python scanned_hf.py --model '<json>' --src <HF dir> --out <dir>
Writes <out>/0/items. The same steps as scanned.py (a separate file so scanned.py's cached Meta references keep
their keys); only the checkpoint route differs.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap(device_count=16)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True, help="JSON (or a path to it) of the synthetic model")
  parser.add_argument("--src", required=True, help="directory of *.safetensors (save_pretrained output)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  model = _common.load_model(args.model)
  name = _common.model_name(model)

  t0 = time.time()
  import importlib  # pylint: disable=import-outside-toplevel

  mod = importlib.import_module("maxtext.checkpoint_conversion.standalone_scripts.llama_or_mistral_ckpt")
  t_import = time.time() - t0
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
      mod.convert_to_jax_weights(args.src, name, True),  # --huggingface-checkpoint true
      mod.SIMULATED_CPU_DEVICES_COUNT,
      True,  # --use-ocdbt default
      True,  # --use-zarr3 default
  )
  items = os.path.join(args.out, "0", "items")
  if not os.path.isdir(items):
    raise SystemExit(f"MaxText wrote no {items}")
  print(
      f"REF_SCANNED_HF model_name={name} maxtext={_common.check_version()} import_s={t_import:.1f} "
      f"convert_s={time.time() - t1:.1f} out={items}"
  )


if __name__ == "__main__":
  _common.run_main(main)
