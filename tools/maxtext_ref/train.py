"""A tiny MaxText training run that saves a training checkpoint (params + optimizer state), with maxtext 0.2.5's own
``maxtext.trainers.pre_train.train`` on CPU: the synthetic model's dims, synthetic data, a few steps.

Usage (reference env): python train.py --model '<json>' --out <dir> [--steps N] [--scan-layers true|false]
Writes <out>/train/checkpoints/<step>/items (Orbax, as the trainer saves it: params and opt_state).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()


#: The real-data input pipelines and the functions input_pipeline_interface imports from them. The reference env has
#: none of their dependencies (grain, ml_collections, datasets, tensorflow); dataset_type=synthetic never calls them.
REAL_DATA_PIPELINES = {
    "grain_data_processing": ("make_grain_train_iterator", "make_grain_eval_iterator"),
    "hf_data_processing": ("make_hf_train_iterator", "make_hf_eval_iterator"),
    "olmo_grain_data_processing": ("make_olmo_grain_train_iterator", "make_olmo_grain_eval_iterator"),
}


def stub_real_data_pipelines():
  """Put stand-ins for the real-data pipeline modules in sys.modules (each function raises if ever called)."""
  import types  # pylint: disable=import-outside-toplevel

  for module, functions in REAL_DATA_PIPELINES.items():
    stub = types.ModuleType(f"maxtext.input_pipeline.{module}")
    for function in functions:

      def unavailable(*_, _name=function, **__):
        raise SystemExit(f"{_name} needs a real-data pipeline the reference env does not have")

      setattr(stub, function, unavailable)
    sys.modules[stub.__name__] = stub


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--scan-layers", default="true", choices=("true", "false"))
  args = parser.parse_args()
  model = _common.load_model(args.model)

  t0 = time.time()
  stub_real_data_pipelines()
  from maxtext.trainers.pre_train import train  # pylint: disable=import-outside-toplevel

  t_import = time.time() - t0
  # Training keeps float32 weights (base.yml's default); the converters' weight_dtype=bfloat16 is left out.
  argv = [a for a in _common.config_args(model) if not a.startswith("weight_dtype=")] + [
      "weight_dtype=float32",
      f"base_output_directory={args.out}",
      "run_name=train",
      "dataset_type=synthetic",
      f"steps={args.steps}",
      f"checkpoint_period={args.steps}",
      f"scan_layers={args.scan_layers}",
      "per_device_batch_size=1",
      "max_target_length=32",
      "attention=dot_product",
  ]
  print("ARGV", " ".join(argv[1:]), flush=True)
  t1 = time.time()
  train.main(argv)
  root = os.path.join(args.out, "train", "checkpoints")
  steps = sorted(os.listdir(root)) if os.path.isdir(root) else []
  if not steps:
    raise SystemExit(f"MaxText wrote no checkpoint under {root}")
  print(f"REF_TRAIN model_name={_common.model_name(model)} maxtext={_common.check_version()} import_s={t_import:.1f} "
        f"run_s={time.time() - t1:.1f} steps={steps}")


if __name__ == "__main__":
  _common.run_main(main)
