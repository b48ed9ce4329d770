"""HF safetensors -> MaxText bf16 checkpoint with MaxText 0.2.5's own ``checkpoint_conversion/to_maxtext.py``.

Usage (reference env, maxtext 0.2.5):
  python to_maxtext_hf.py --src <HF dir> --name <MaxText model name> --scan true|false --out <dir>
Writes <out>/0/items with to_maxtext's defaults (lazy loading, 16 simulated CPU devices, bfloat16).

A synthetic checkpoint's dims are not any published model's, and to_maxtext takes them from two places, so both are
replaced: the HF config it reads the layer/expert counts from (``HF_MODEL_CONFIGS[name]``, one dict shared with the
module that imported it) becomes the checkpoint's own ``config.json``, and the MaxText model it builds the abstract
tree from gets the same dims as overrides (``override_model_config=true``). ``--name`` picks the MaxText model whose
other settings apply (e.g. ``qwen3-0.6b``: tied embeddings, no logits_dense; ``qwen3-30b-a3b``: the MoE decoder).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

_common.bootstrap(device_count=16)  # to_maxtext's default --simulated_cpu_devices_count


def overrides(config: dict) -> list[str]:
  """MaxText key=value overrides giving the HF config's dims (the MoE ones only for an MoE config), rope base and
  norm epsilon: the model MaxText builds is then the checkpoint's own (its logits are comparable with HF's)."""
  experts = config.get("num_experts", config.get("num_local_experts", 0))
  mlp = config["moe_intermediate_size"] if experts else config["intermediate_size"]
  theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
  out = [
      f"rope_max_timescale={int(theta) if float(theta).is_integer() else theta}",
      f"normalization_layer_epsilon={config.get('rms_norm_eps', 1e-6)}",
      f"base_emb_dim={config['hidden_size']}",
      f"base_num_query_heads={config['num_attention_heads']}",
      f"base_num_kv_heads={config['num_key_value_heads']}",
      f"head_dim={config['head_dim']}",
      f"base_mlp_dim={mlp}",
      f"base_num_decoder_layers={config['num_hidden_layers']}",
      f"vocab_size={config['vocab_size']}",
  ]
  if experts:
    out += [f"num_experts={experts}", f"num_experts_per_tok={config['num_experts_per_tok']}",
            f"base_moe_mlp_dim={config['moe_intermediate_size']}"]
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--src", required=True, help="directory of config.json + *.safetensors (save_pretrained)")
  parser.add_argument("--name", required=True, help="MaxText model name to register the checkpoint's config under")
  parser.add_argument("--scan", required=True, choices=("true", "false"))
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  with open(os.path.join(args.src, "config.json"), encoding="utf8") as f:
    config = json.load(f)

  t0 = time.time()
  import jax  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion import to_maxtext  # pylint: disable=import-outside-toplevel
  from maxtext.checkpoint_conversion.utils import hf_model_configs  # pylint: disable=import-outside-toplevel

  t_import = time.time() - t0
  if args.name not in hf_model_configs.HF_MODEL_CONFIGS:
    raise SystemExit(f"MaxText has no HF config named {args.name!r}")
  hf_model_configs.HF_MODEL_CONFIGS[args.name] = transformers.AutoConfig.from_pretrained(args.src)
  assert to_maxtext.HF_MODEL_CONFIGS is hf_model_configs.HF_MODEL_CONFIGS
  # What to_maxtext's __main__ does before main().
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  jax.config.update("jax_platforms", "cpu")
  argv = [
      "to_maxtext",
      os.path.join(_common.maxtext_root(), "configs", "base.yml"),
      f"model_name={args.name}",
      "override_model_config=true",
      *overrides(config),
      f"scan_layers={args.scan}",
      f"base_output_directory={args.out}",
      "skip_jax_distributed_system=true",
      "hardware=cpu",
  ]
  print("ARGV", " ".join(argv[1:]), flush=True)
  t1 = time.time()
  to_maxtext.main(args=argv, lazy_load_tensors=True, hf_model_path=args.src, simulated_cpu_devices_count=16)
  items = os.path.join(args.out, "0", "items")
  if not os.path.isdir(items):
    raise SystemExit(f"MaxText wrote no {items}")
  print(f"REF_TO_MAXTEXT model_name={args.name} scan={args.scan} maxtext={_common.check_version()} "
        f"import_s={t_import:.1f} convert_s={time.time() - t1:.1f} out={items}")


if __name__ == "__main__":
  _common.run_main(main)
