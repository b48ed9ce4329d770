"""MaxText checkpoint -> Hugging Face safetensors, with maxtext 0.2.5's own ``checkpoint_conversion.to_huggingface``.

Usage (reference env): python to_hf.py --model '<json>' --items <.../items> --scan-layers true|false --out <dir>
                       [--max-shard-size BYTES]
Writes <out>/config.json, <out>/model.safetensors (or model-0000K-of-0000N.safetensors + the index).

What is changed around MaxText (nothing inside it):
* ``--override_model_architecture`` (absl flag): the HF config of the registered model name takes the synthetic
  dims from the MaxText config instead of failing on the mismatch;
* the tokenizer load (``AutoTokenizer.from_pretrained``, the Hub) is stubbed to return None, so MaxText saves no
  tokenizer files (``save_model_files`` skips a None tokenizer);
* ``--max-shard-size`` replaces the default of ``utils.shard_checkpoint`` (DEFAULT_MAX_SHARD_SIZE, 3 GiB), so a tiny
  model is split into several files the way a real one is.
"""

import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()  # one host device, as to_huggingface's own __main__ sets


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--items", required=True, help="the checkpoint's items directory (load_parameters_path)")
  parser.add_argument("--scan-layers", required=True, choices=("true", "false"))
  parser.add_argument("--out", required=True)
  parser.add_argument("--max-shard-size", type=int, default=None)
  args = parser.parse_args()
  model = _common.load_model(args.model)

  t0 = time.time()
  from absl import flags  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion import to_huggingface  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion.utils import utils  # pylint: disable=import-outside-toplevel

  t_import = time.time() - t0
  flags.FLAGS(["to_huggingface", "--override_model_architecture"])
  to_huggingface.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)
  if args.max_shard_size is not None:
    utils.shard_checkpoint.__defaults__ = (args.max_shard_size, "model.safetensors")
  argv = _common.config_args(
      model,
      f"load_parameters_path={args.items}",
      f"scan_layers={args.scan_layers}",
      f"base_output_directory={args.out}",
      "run_name=to_hf",
  )
  print("ARGV", " ".join(argv[1:]), flush=True)
  t1 = time.time()
  to_huggingface.main(argv)
  if not os.path.exists(os.path.join(args.out, "config.json")):
    raise SystemExit(f"MaxText wrote no {args.out}/config.json")
  print(f"REF_TO_HF model_name={_common.model_name(model)} maxtext={_common.check_version()} import_s={t_import:.1f} "
        f"run_s={time.time() - t1:.1f} files={sorted(os.listdir(args.out))}")


if __name__ == "__main__":
  _common.run_main(main)
