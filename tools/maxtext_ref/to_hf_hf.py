"""MaxText checkpoint of an HF-sourced model (Qwen3) -> HF safetensors with maxtext 0.2.5's own ``to_huggingface.py``.

Usage (reference env, maxtext 0.2.5):
  python to_hf_hf.py --src <HF dir> --name <MaxText model name> --items <.../items> --scan-layers true|false
                     --out <dir> [--max-shard-size BYTES]
Writes <out>/config.json, <out>/model.safetensors (or model-0000K-of-0000N.safetensors + the index).

The model is registered the way to_maxtext_hf.py registers it for the way in (nothing inside MaxText changes):
``HF_MODEL_CONFIGS[name]`` (the dict ``to_huggingface`` imported by name) becomes ``<src>/config.json``, and the
dims go to MaxText as overrides (``override_model_config=true``, to_maxtext_hf.overrides). Around ``main`` as
to_hf.py: ``--override_model_architecture``, ``weight_dtype=bfloat16``, the tokenizer load stubbed (no Hub, no
tokenizer files), ``--max-shard-size`` replacing ``utils.shard_checkpoint``'s default (3 GiB).
"""

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position
import to_maxtext_hf  # pylint: disable=wrong-import-position

_common.bootstrap()  # last: to_maxtext_hf's import set 16 simulated devices; to_huggingface's __main__ sets one


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--src", required=True, help="the HF directory whose config.json is the model")
  parser.add_argument("--name", required=True, help="MaxText model name to register the config under")
  parser.add_argument("--items", required=True, help="the checkpoint's items directory (load_parameters_path)")
  parser.add_argument("--scan-layers", required=True, choices=("true", "false"))
  parser.add_argument("--out", required=True)
  parser.add_argument("--max-shard-size", type=int, default=None)
  args = parser.parse_args()
  with open(os.path.join(args.src, "config.json"), encoding="utf8") as f:
    config = json.load(f)

  t0 = time.time()
  import jax  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion import to_huggingface  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion.utils import hf_model_configs, utils  # pylint: disable=import-outside-toplevel

  t_import = time.time() - t0
  if args.name not in hf_model_configs.HF_MODEL_CONFIGS:
    raise SystemExit(f"MaxText has no HF config named {args.name!r}")
  hf_model_configs.HF_MODEL_CONFIGS[args.name] = transformers.AutoConfig.from_pretrained(args.src)
  assert to_huggingface.HF_MODEL_CONFIGS is hf_model_configs.HF_MODEL_CONFIGS
  flags.FLAGS(["to_huggingface", "--override_model_architecture"])
  to_huggingface.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)
  if args.max_shard_size is not None:
    utils.shard_checkpoint.__defaults__ = (args.max_shard_size, "model.safetensors")
  # What to_huggingface's __main__ does before main().
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  jax.config.update("jax_platforms", "cpu")
  argv = [
      "to_huggingface",
      os.path.join(_common.maxtext_root(), "configs", "base.yml"),
      f"model_name={args.name}",
      "override_model_config=true",
      *to_maxtext_hf.overrides(config),
      f"scan_layers={args.scan_layers}",
      f"load_parameters_path={args.items}",
      f"base_output_directory={args.out}",
      "run_name=to_hf",
      "weight_dtype=bfloat16",
      "skip_jax_distributed_system=true",
      "hardware=cpu",
  ]
  print("ARGV", " ".join(argv[1:]), flush=True)
  t1 = time.time()
  to_huggingface.main(argv)
  if not os.path.exists(os.path.join(args.out, "config.json")):
    raise SystemExit(f"MaxText wrote no {args.out}/config.json")
  print(f"REF_TO_HF_HF name={args.name} scan={args.scan_layers} maxtext={_common.check_version()} "
        f"import_s={t_import:.1f} run_s={time.time() - t1:.1f} files={sorted(os.listdir(args.out))}")


if __name__ == "__main__":
  _common.run_main(main)
