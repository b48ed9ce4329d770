"""Rebuild the vendored JSON schemas in this folder from their upstream sources.

Not run by the tests (they read the committed JSON files); kept so the files can be regenerated or
moved to another pinned version. See README.md here for where the inputs come from.

    python tests/schemas/build.py \
        --rayjob-crd v1.7.0=ray.io_rayjobs-v1.7.0.yaml \
        --rayjob-crd v1.2.2=ray.io_rayjobs-v1.2.2.yaml \
        --k8s-schemas kubernetes-json-schema/v1.34.0-local-strict

``ray.io_rayjobs-<tag>.yaml`` is ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` of ray-project/kuberay at
that tag; the k8s folder comes from the kubernetes-validate 1.37.0 wheel on PyPI.

What it does:
* RayJob: takes ``spec.versions[name=v1].schema.openAPIV3Schema`` from the CRD and makes it strict the way
  the API server's strict field validation (kubectl's default) behaves: every object schema that lists
  ``properties`` and neither allows ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
  gets ``additionalProperties: false``, so a misspelt field fails validation instead of being pruned.
  ``apiVersion``/``kind`` are pinned to ``ray.io/v1``/``RayJob``.
* batch/v1 Job: inlines the definitions reachable from ``job-batch-v1.json`` into one standalone file
  (``$defs`` + local ``#/$defs/...`` refs). kubernetes-validate's ``-strict`` schemas already carry
  ``additionalProperties: false``.
* Both: ``description`` strings are dropped (they are most of the bytes and never affect validation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
K8S_VERSION = "v1.34.0"


def strip_descriptions(node: Any, *, in_properties: bool = False) -> Any:
    """Remove ``description`` annotations (but keep a *property* that happens to be named description)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and not in_properties and isinstance(value, str):
                continue
            out[key] = strip_descriptions(value, in_properties=(key in ("properties", "$defs")))
        return out
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def make_strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: make_strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [make_strict(v) for v in node]
    return node


def build_rayjob(crd_path: Path, tag: str) -> dict:
    crd = yaml.safe_load(crd_path.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = make_strict(strip_descriptions(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"] = {"type": "string", "enum": ["ray.io/v1"]}
    schema["properties"]["kind"] = {"type": "string", "enum": ["RayJob"]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"KubeRay {tag} RayJob (ray.io/v1) openAPIV3Schema, strict; built by build.py",
        **schema,
    }


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _localize(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _localize(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            out["$ref"] = "#/$defs/" + ref.split("#/$defs/", 1)[1]
        return out
    if isinstance(node, list):
        return [_localize(v) for v in node]
    return node


def build_job(schema_dir: Path) -> dict:
    root = json.loads((schema_dir / "job-batch-v1.json").read_text())
    defs = json.loads((schema_dir / "_definitions.json").read_text())["$defs"]
    needed: set[str] = set()
    _refs(root, needed)
    # The pod template is also used to check the RayJob's pod templates against core/v1.
    needed.add("io.k8s.api.core.v1.PodTemplateSpec")
    done: set[str] = set()
    while needed - done:
        name = sorted(needed - done)[0]
        done.add(name)
        _refs(defs[name], needed)
    out = _localize(strip_descriptions(root))
    out["$id"] = f"https://kubernetes.io/api/job/batch/v1/{K8S_VERSION}/standalone-strict"
    out["$comment"] = f"Kubernetes {K8S_VERSION} batch/v1 Job, standalone strict; built by build.py"
    out["$defs"] = {name: _localize(strip_descriptions(defs[name])) for name in sorted(done)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rayjob-crd", action="append", required=True, metavar="TAG=PATH")
    parser.add_argument("--k8s-schemas", type=Path, required=True)
    args = parser.parse_args()
    targets = {HERE / f"kubernetes-{K8S_VERSION}" / "job-batch-v1.json": build_job(args.k8s_schemas)}
    for item in args.rayjob_crd:
        tag, _, path = item.partition("=")
        targets[HERE / f"kuberay-{tag}" / "rayjob-ray-v1.json"] = build_rayjob(Path(path), tag)
    for path, schema in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{path.relative_to(HERE)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
