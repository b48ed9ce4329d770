"""MaxText's own description of its models with a given name prefix, as JSON (reference env, maxtext 0.2.5).

Usage: python model_configs.py --prefix qwen3- --out <file.json>
Writes {name: {"hf": HF_MODEL_CONFIGS[name].to_dict(), "yml": configs/models/<name>.yml (or null),
"param_mapping": bool, "hf_ids": bool}} for every name in HF_MODEL_CONFIGS or PARAM_MAPPING with the prefix: the
dims rayconv's family tables must agree with, and which names to_maxtext.py can convert (it needs both
``HF_IDS[name]`` and ``PARAM_MAPPING[name]``).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--prefix", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  import yaml  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion.utils.hf_model_configs import HF_MODEL_CONFIGS  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion.utils.param_mapping import PARAM_MAPPING  # pylint: disable=import-outside-toplevel
  from maxtext.utils.globals import HF_IDS  # pylint: disable=import-outside-toplevel

  out = {}
  for name in sorted(set(HF_MODEL_CONFIGS) | set(PARAM_MAPPING)):
    if not name.startswith(args.prefix):
      continue
    yml = os.path.join(_common.maxtext_root(), "configs", "models", f"{name}.yml")
    hf = HF_MODEL_CONFIGS.get(name)
    hf_dict = hf if hf is None or isinstance(hf, dict) else hf.to_dict()
    with open(yml, encoding="utf8") if os.path.exists(yml) else open(os.devnull, encoding="utf8") as f:
      out[name] = {"hf": hf_dict, "yml": yaml.safe_load(f.read()) if os.path.exists(yml) else None,
                   "param_mapping": name in PARAM_MAPPING, "hf_ids": name in HF_IDS}
  with open(args.out, "w", encoding="utf8") as f:
    json.dump(out, f, indent=1, sort_keys=True, default=str)
  print(f"REF_MODEL_CONFIGS prefix={args.prefix} models={len(out)} maxtext={_common.check_version()}")


if __name__ == "__main__":
  _common.run_main(main)
