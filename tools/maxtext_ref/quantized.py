"""MaxText unscanned bf16 checkpoint -> AQT quantized checkpoint.

* linen (maxtext 0.2.4, classic flags): maxtext.checkpoint_conversion.load_and_quantize_checkpoint
  (MaxEngine.load_params -> quantize_params -> save_quantized_params_path), the classic ``params/aqt`` tree;
* nnx (maxtext 0.2.5, default flags): maxtext.utils.layerwise_quantization, the NNX tree
  ``decoder/.../AqtDotGeneral_0/qrhs/frozen/value/...`` (0.2.5's load_and_quantize_checkpoint writes nothing).

Usage (reference env): python quantized.py --model '<json>' --unscanned <.../0/items> --out <dir> [--quant int8|int8w|int4w]
Writes the PyTreeCheckpointer directory <out> (no step dir, no items).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()

#: Prefill/target lengths used by the notes' reference runs; quantization itself does not depend on them.
LENGTH_ARGS = ["per_device_batch_size=1", "max_prefill_predict_length=16", "max_target_length=32"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--unscanned", required=True, help="the unscanned checkpoint's .../0/items")
  parser.add_argument("--out", required=True)
  parser.add_argument("--quant", default="int8", choices=_common.QUANT_KINDS)
  args = parser.parse_args()
  model = _common.load_model(args.model)

  t0 = time.time()
  if _common.layout() == "nnx":
    from maxtext.utils import layerwise_quantization as laq  # pylint: disable=import-outside-toplevel
  else:
    from maxtext.checkpoint_conversion import load_and_quantize_checkpoint as laq  # pylint: disable=import-outside-toplevel

  t_import = time.time() - t0
  argv = _common.config_args(
      model,
      f"load_parameters_path={args.unscanned}",
      "scan_layers=false",
      *_common.quant_args(args.quant),
      "checkpoint_is_quantized=false",
      f"save_quantized_params_path={args.out}",
      "attention=dot_product",
      *LENGTH_ARGS,
  )
  print("ARGV", " ".join(argv[1:]), flush=True)
  t1 = time.time()
  laq.main(argv)
  if not os.path.exists(os.path.join(args.out, "_METADATA")):
    raise SystemExit(f"MaxText wrote no quantized checkpoint at {args.out} (no _METADATA)")
  print(f"REF_QUANTIZED quant={args.quant} import_s={t_import:.1f} run_s={time.time() - t1:.1f} out={args.out}")


if __name__ == "__main__":
  _common.run_main(main)
