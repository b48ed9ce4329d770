#!/usr/bin/env python
"""Run MaxText 0.2.4's own converters/loaders (the reference rayconv is compared with) from the command line.

Wraps tools/maxtext_ref/reference.py (same cache, same reference env). Examples:

    .venvs/main/bin/python scripts/maxtext_reference.py chain --preset demo           # scanned+unscanned+int8
    .venvs/main/bin/python scripts/maxtext_reference.py scanned --model '{"family": "llama-3.1", "dim": 256}'
    .venvs/main/bin/python scripts/maxtext_reference.py load-check --kind int8 --path out/int8 --preset demo
    .venvs/main/bin/python scripts/maxtext_reference.py logits --kind unscanned --path .../0/items --preset demo

--model takes SyntheticModel fields as JSON (missing fields keep their defaults); --preset a name from
rayconv.synthetic.PRESETS. Prints one JSON document: paths, per-script wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools" / "maxtext_ref")]

import numpy as np  # noqa: E402

import reference  # noqa: E402
from rayconv.synthetic import PRESETS, SyntheticModel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "command", choices=["scanned", "unscanned", "int8", "int8w", "int4w", "chain", "load-check", "logits"]
    )
    parser.add_argument("--model", help="SyntheticModel fields as JSON")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--src", help="an existing Meta-format checkpoint written for this model")
    parser.add_argument("--cache", help="cache dir (default RAYCONV_REF_CACHE or <repo>/.cache/maxtext-ref)")
    parser.add_argument("--kind", choices=reference.KINDS, help="checkpoint kind for load-check / logits")
    parser.add_argument("--path", help="checkpoint for load-check / logits (default: the reference of --kind)")
    parser.add_argument("--quant", default="int8", choices=reference.QUANT_KINDS, help="quantization for chain")
    parser.add_argument("--logits-out", help="save logits .npy here")
    args = parser.parse_args(argv)

    if args.preset:
        model = PRESETS[args.preset]
    else:
        model = SyntheticModel(**json.loads(args.model or "{}"))
    ref = reference.MaxTextReference(args.cache)
    result: dict = {"model": reference.model_spec(model), "maxtext_model_name": reference.maxtext_model_name(model)}
    try:
        if args.command in ("scanned", "unscanned") or args.command in reference.QUANT_KINDS:
            result["path"] = str(ref.reference(model, args.command, args.src))
        elif args.command == "chain":
            result["scanned"] = str(ref.scanned(model, args.src))
            result["unscanned"] = str(ref.unscanned(model, args.src))
            result[args.quant] = str(ref.quantized(model, args.src, args.quant))
        else:
            if not args.kind:
                parser.error("--kind is required")
            path = Path(args.path) if args.path else ref.reference(model, args.kind, args.src)
            if args.command == "load-check":
                summary = ref.load_check(model, path, args.kind)
                result["load_check"] = {k: v for k, v in summary.items() if k != "leaves"}
                result["leaves"] = {k: [v["dtype"], v["shape"], v["sha256"][:16]] for k, v in summary["leaves"].items()}
            else:
                logits = ref.logits(model, path, args.kind)
                if args.logits_out:
                    np.save(args.logits_out, logits)
                result["logits"] = {
                    "shape": list(logits.shape),
                    "argmax": logits.argmax(-1).tolist(),
                    "absmax": float(np.abs(logits).max()),
                }
    except reference.ReferenceError as e:
        print(str(e), file=sys.stderr)
        return 3 if isinstance(e, reference.ReferenceUnsupported) else 1
    finally:
        result["runs"] = [r.__dict__ for r in ref.runs]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
