"""MaxText scanned checkpoint -> unscanned bf16 param-only checkpoint, with maxtext.utils.generate_param_only_checkpoint:
maxtext 0.2.4 with pure_nnx/enable_nnx/pure_nnx_decoder=false writes the classic Linen tree (``params/params/...``,
``step``, ``opt_state``); maxtext 0.2.5 (default flags) writes an NNX decode checkpoint (``decoder/.../kernel/value``).

Usage (reference env): python unscanned.py --model '<json>' --scanned <.../0/items> --out-base <dir> --run-name <name>
Writes <out-base>/<run-name>/checkpoints/0/items.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--scanned", required=True, help="the scanned checkpoint's .../0/items")
  parser.add_argument("--out-base", required=True)
  parser.add_argument("--run-name", default="unscanned")
  args = parser.parse_args()
  model = _common.load_model(args.model)

  t0 = time.time()
  from maxtext.utils import generate_param_only_checkpoint as gen  # pylint: disable=import-outside-toplevel

  t_import = time.time() - t0
  argv = _common.config_args(
      model,
      f"load_parameters_path={args.scanned}",
      f"base_output_directory={args.out_base}",
      f"run_name={args.run_name}",
      "force_unroll=true",
      "opt_type=sgd",
      "scan_layers=true",
  )
  print("ARGV", " ".join(argv[1:]), flush=True)
  t1 = time.time()
  gen.main(argv)
  items = os.path.join(args.out_base, args.run_name, "checkpoints", "0", "items")
  if not os.path.isdir(items):
    raise SystemExit(f"MaxText wrote no {items}")
  print(f"REF_UNSCANNED model_name={_common.model_name(model)} import_s={t_import:.1f} run_s={time.time() - t1:.1f} out={items}")


if __name__ == "__main__":
  _common.run_main(main)
