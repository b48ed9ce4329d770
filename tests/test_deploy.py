"""Deployment checks (issue 7), without a cloud: the manifests, the `ray up` config and the image recipe.

1. ``k8s/rayjob.yaml`` validates against KubeRay's RayJob CRD schema (v1.2.2 and v1.7.0, strict: unknown fields
   fail) and its pod templates against the Kubernetes v1.34 PodTemplateSpec schema; ``k8s/checkpoint-converter.yaml``
   against the Kubernetes v1.34 batch/v1 Job schema. Both are then checked for the rules the schemas cannot express:
   KubeRay's own admission checks, Workload Identity on every pod, memory pinning that adds up, the tutorial's flags.
2. ``cluster.yaml`` goes through Ray's own cluster-config path (``prepare_config`` + ``validate_config``, ray 2.60).
3. ``Dockerfile`` is parsed: the base image pins the Ray version that the lock and the RayJob use, and it installs
   rayconv from the repo's own files with the lock as constraints.
4. End to end: a local ``ray start --head`` cluster with the resources of the RayJob's cluster, and the RayJob's exact
   entrypoint submitted the way KubeRay's submitter does it (``bash -ce`` around ``ray job submit``), with only the
   placeholder values replaced: ``${META_URL}`` by a CloudFront-shaped signed URL serving a synthetic 16-shard
   405B-layout checkpoint, ``${BUCKET_NAME}`` by a bucket on fake-gcs-server.

Schemas are vendored in tests/schemas (see its README.md for sources and versions).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray_cluster import LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "schemas"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
JOB = ROOT / "k8s" / "checkpoint-converter.yaml"
CLUSTER = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "deployment.md"
LOCK = ROOT / "requirements" / "main.lock"
GiB = 1 << 30

#: Placeholders the user fills in (envsubst), per file. Everything else must be a literal value.
MANIFEST_PLACEHOLDERS = {"IMAGE", "BUCKET_NAME", "META_URL"}
CLUSTER_PLACEHOLDERS = {"PROJECT_ID", "REGION", "ZONE"}

#: The tutorial's checkpoint-converter Job (GoogleCloudPlatform/ai-on-gke,
#: tutorials-and-examples/inference-servers/checkpoints/examples/llama3.1-405b/checkpoint-converter.yaml):
#: flag → value, with its placeholders in ${...} form.
TUTORIAL_FLAGS = {
    "--bucket_name": "${BUCKET_NAME}",
    "--inference_server": "jetstream-maxtext",
    "--meta_url": "${META_URL}",
    "--model_name": "llama-3.1",
    "--model_path": "Llama3.1-405B-Instruct:bf16-mp16",
    "--output_directory": "gs://${BUCKET_NAME}/maxtext/llama-3.1-405b",
    "--quantize_type": "int8",
    "--quantize_weights": "True",
}
#: Flags that say where/how wide to run (may differ between the RayJob and the single-pod Job).
CLUSTER_FLAGS = {"--address", "--num_workers", "--worker_memory_gb"}

#: A Meta URL with every character class such URLs carry ('*', '&', '%7E', '~', '-', '_', '=').
SAMPLE_META_URL = ("https://llama3-1.llamameta.net/*?Policy=eyJTdGF0ZW1lbnQiOlt7InVuaXF1ZV9oYXNoIjoiYWJjIn1dfQ__"
                   "&Signature=rAX0HPgJ%7EER2ID0rMNw-FLJ_BSYwF~jWL&Key-Pair-Id=K15QRJLYKIFSLZ"
                   "&Download-Request-ID=1025948705787836")
SAMPLE_VALUES = {"IMAGE": "us-central1-docker.pkg.dev/my-project/rayconv/rayconv:0.1.0",
                 "BUCKET_NAME": "my-llama-checkpoints", "META_URL": SAMPLE_META_URL,
                 "PROJECT_ID": "my-project", "REGION": "us-central1", "ZONE": "us-central1-a"}

#: Machine types the manifests and cluster.yaml select: (vCPUs, memory in GiB; Compute Engine's "GB").
MACHINES = {"n2-standard-8": (8, 32), "n2-highmem-16": (16, 128), "n2-highmem-32": (32, 256)}
#: Requests of GKE's own DaemonSets on a node (kube-proxy, fluentbit, gke-metadata-server, netd, CSI, ...),
#: rounded up generously.
DAEMONSET_CPU, DAEMONSET_MEMORY = 1.0, 2 * GiB


def gke_allocatable(machine: str) -> tuple[float, int]:
    """Node allocatable CPU and memory per GKE's reservation tables (plan-node-sizes), minus DaemonSets."""
    vcpus, gib = MACHINES[machine]
    cpu_reserved = sum(share * max(0.0, min(vcpus, hi) - lo)
                       for lo, hi, share in ((0, 1, .06), (1, 2, .01), (2, 4, .005), (4, 1 << 20, .0025)))
    mem_reserved = sum(share * max(0.0, min(gib, hi) - lo)
                       for lo, hi, share in ((0, 4, .25), (4, 8, .2), (8, 16, .1), (16, 128, .06), (128, 1 << 20, .02)))
    eviction = 100 / 1024
    return (vcpus - cpu_reserved - DAEMONSET_CPU,
            int((gib - mem_reserved - eviction) * GiB) - DAEMONSET_MEMORY)


# ------------------------------------------------------------------------------------------------
# helpers


def envsubst(text: str, values: dict[str, str]) -> str:
    """``envsubst '${A} ${B}'``: replace only the named ${VAR}s."""
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)\}", lambda m: values.get(m[1], m[0]), text)


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))


def load(path: Path, values: dict[str, str] | None = None) -> dict:
    text = path.read_text()
    if values is not None:
        text = envsubst(text, values)
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def errors_of(validator: jsonschema.protocols.Validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def k8s_validator(ref: str | None = None) -> jsonschema.protocols.Validator:
    """The vendored batch/v1 Job schema, or one of its definitions (e.g. core/v1 PodTemplateSpec)."""
    job = schema("kubernetes-v1.34.0/job-batch-v1.json")
    if ref is not None:
        job = {"$schema": job["$schema"], "$defs": job["$defs"], "$ref": f"#/$defs/{ref}"}
    cls = jsonschema.validators.validator_for(job)
    cls.check_schema(job)
    return cls(job)


def quantity_bytes(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(value))
    assert m, f"unsupported memory quantity {value!r}"
    return int(float(m[1]) * units.get(m[2] or "", 1))


def quantity_cpu(value: str) -> float:
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


def flags_of(argv: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` → {--name: value}; dashes normalised to the tutorial's underscores."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r}"
        if "=" in arg:
            name, value = arg.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            name, value = arg, argv[i + 1]
            i += 1
        else:
            name, value = arg, "true"
        name = "--" + name[2:].replace("-", "_")
        assert name not in out, f"flag {name} given twice"
        out[name] = value
        i += 1
    return out


def rayjob_argv(rayjob: dict) -> list[str]:
    """The entrypoint as the head's shell will see it (KubeRay passes it through bash)."""
    argv = shlex.split(rayjob["spec"]["entrypoint"].strip())
    assert argv[:2] == ["rayconv", "convert"], argv[:2]
    return argv


def job_argv(job: dict) -> list[str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    argv = list(container.get("command", [])) + list(container.get("args", []))
    assert argv[:2] == ["rayconv", "convert"], argv[:2]
    return argv


def pod_templates(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]
    return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continuation line"
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches everything below a matching dir."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = (raw[1:] if negate else raw).strip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*/", "(?:.*/)?")
        hit = any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1))
        if hit:
            excluded = not negate
    return excluded


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


# ------------------------------------------------------------------------------------------------
# 1. Kubernetes manifests


@pytest.mark.parametrize("kuberay", ["v1.2.2", "v1.7.0"])
def test_rayjob_matches_kuberay_crd_schema(kuberay):
    crd = schema(f"kuberay-{kuberay}/rayjob-ray-v1.json")
    validator = jsonschema.Draft7Validator(crd)
    for values in (None, SAMPLE_VALUES):  # as shipped, and after envsubst
        assert errors_of(validator, load(RAYJOB, values)) == []


def test_rayjob_strict_schema_catches_a_misspelt_field():
    """The vendored CRD schema is strict (as `kubectl apply` with server-side field validation)."""
    validator = jsonschema.Draft7Validator(schema("kuberay-v1.7.0/rayjob-ray-v1.json"))
    rayjob = load(RAYJOB)
    rayjob["spec"]["shutdownAfterJobFinish"] = True
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeselector"] = {}
    problems = errors_of(validator, rayjob)
    assert any("shutdownAfterJobFinish" in p for p in problems), problems
    assert any("nodeselector" in p for p in problems), problems


def test_rayjob_pod_templates_match_kubernetes_schema():
    validator = k8s_validator("io.k8s.api.core.v1.PodTemplateSpec")
    for name, template in pod_templates(load(RAYJOB, SAMPLE_VALUES)).items():
        assert errors_of(validator, template) == [], name


def test_job_matches_kubernetes_schema():
    validator = k8s_validator()
    for values in (None, SAMPLE_VALUES):
        assert errors_of(validator, load(JOB, values)) == []
    broken = load(JOB)
    broken["spec"]["template"]["spec"]["containers"][0]["arg"] = []
    assert any("arg" in p for p in errors_of(validator, broken))


def test_rayjob_passes_kuberay_admission_rules():
    """What KubeRay's ValidateRayJobSpec / ValidateRayClusterSpec (v1.7.0 utils/validation.go) reject."""
    rayjob = load(RAYJOB)
    name = rayjob["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    spec = rayjob["spec"]
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    assert spec["shutdownAfterJobFinishes"] is True and "deletionStrategy" not in spec
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert 3600 <= spec["activeDeadlineSeconds"] <= 24 * 3600
    assert 0 <= spec["backoffLimit"] <= 3
    assert "clusterSelector" not in spec and not spec.get("suspend", False)
    cluster = spec["rayClusterSpec"]
    assert not cluster.get("enableInTreeAutoscaling", False)
    assert len(cluster["headGroupSpec"]["template"]["spec"]["containers"]) >= 1
    for group in cluster["workerGroupSpecs"]:
        assert len(group["template"]["spec"]["containers"]) >= 1
        # Autoscaling is off: KubeRay requires min and max, and the group is fixed at `replicas`.
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] > 0, group["groupName"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert not (set(group.get("rayStartParams", {})) & set(group.get("resources", {})))


def test_every_pod_uses_workload_identity():
    pods = dict(pod_templates(load(RAYJOB)))
    pods["checkpoint-converter"] = load(JOB)["spec"]["template"]
    for name, template in pods.items():
        spec = template["spec"]
        assert spec.get("serviceAccountName") == "rayconv", name
        assert spec.get("nodeSelector", {}).get("iam.gke.io/gke-metadata-server-enabled") == "true", name
        assert spec["nodeSelector"].get("node.kubernetes.io/instance-type") in MACHINES, name
        assert "automountServiceAccountToken" not in spec, name


def _pinned_resources(name: str, template: dict) -> tuple[float, int, str]:
    """(cpu, memory bytes, machine type) of a pod whose requests equal its limits and fit its node."""
    container = template["spec"]["containers"][0]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], f"{name}: requests != limits (not Guaranteed QoS)"
    cpu = quantity_cpu(resources["limits"]["cpu"])
    memory = quantity_bytes(resources["limits"]["memory"])
    machine = template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
    alloc_cpu, alloc_memory = gke_allocatable(machine)
    assert cpu <= alloc_cpu, f"{name}: {cpu} CPUs do not fit on {machine} ({alloc_cpu:.2f} allocatable)"
    assert memory <= alloc_memory, f"{name}: {memory / GiB:.0f} GiB do not fit on {machine}"
    return cpu, memory, machine


def test_rayjob_workers_are_memory_pinned_one_converter_per_pod():
    rayjob = load(RAYJOB)
    flags = flags_of(rayjob_argv(rayjob)[2:])
    budget = float(flags["--worker_memory_gb"]) * GiB
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "converters must not run on the head"
    _pinned_resources("head", head["template"])
    slots = 0
    for group in cluster["workerGroupSpecs"]:
        cpu, memory, _ = _pinned_resources(group["groupName"], group["template"])
        ray_cpus = int(group["rayStartParams"].get("num-cpus", int(cpu)))
        object_store = int(group["rayStartParams"].get("object-store-memory", 0))
        assert ray_cpus >= 1 and object_store + budget <= memory
        # KubeRay advertises the container's memory limit as Ray's `memory` resource: it fits one budget only.
        per_pod = min(ray_cpus, int(memory // budget))
        assert per_pod == 1, f"{group['groupName']}: {per_pod} converter actors would share one pod"
        slots += group["replicas"] * per_pod
    assert slots == int(flags["--num_workers"]), "worker pods and --num_workers disagree"
    assert flags["--address"] == "auto"


def test_job_local_ray_fits_its_pod():
    job = load(JOB)
    flags = flags_of(job_argv(job)[2:])
    assert "--address" not in flags, "the single-pod Job starts Ray inside the pod"
    template = job["spec"]["template"]
    cpu, memory, _ = _pinned_resources("checkpoint-converter", template)
    workers, budget = int(flags["--num_workers"]), float(flags["--worker_memory_gb"]) * GiB
    shm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mount = template["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mount
    assert workers <= cpu and workers * budget + quantity_bytes(shm["emptyDir"]["sizeLimit"]) <= memory
    assert template["spec"]["restartPolicy"] == "Never"


def test_manifests_keep_the_tutorials_job_and_flags():
    job, rayjob = load(JOB), load(RAYJOB)
    assert job["metadata"]["name"] == "checkpoint-converter"
    assert job["spec"]["template"]["spec"]["containers"][0]["name"] == "inference-checkpoint"
    for name, argv in (("Job", job_argv(job)), ("RayJob", rayjob_argv(rayjob))):
        flags = flags_of(argv[2:])
        tutorial = {k: v for k, v in flags.items() if k not in CLUSTER_FLAGS}
        assert tutorial == TUTORIAL_FLAGS, name


def test_placeholders_are_the_documented_ones_and_survive_envsubst():
    for path in (RAYJOB, JOB):
        assert placeholders(path.read_text()) == MANIFEST_PLACEHOLDERS, path.name
    assert placeholders(CLUSTER.read_text()) == CLUSTER_PLACEHOLDERS
    # A real signed URL has '&', '*', '%', '~': after envsubst the flag value must still be that exact URL.
    rayjob, job = load(RAYJOB, SAMPLE_VALUES), load(JOB, SAMPLE_VALUES)
    for name, argv in (("RayJob", rayjob_argv(rayjob)), ("Job", job_argv(job))):
        flags = flags_of(argv[2:])
        assert flags["--meta_url"] == SAMPLE_META_URL, name
        assert flags["--output_directory"] == "gs://my-llama-checkpoints/maxtext/llama-3.1-405b", name
    for template in pod_templates(rayjob).values():
        assert template["spec"]["containers"][0]["image"] == SAMPLE_VALUES["IMAGE"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == SAMPLE_VALUES["IMAGE"]


def test_docs_explain_every_placeholder():
    docs = DOCS.read_text()
    for name in sorted(MANIFEST_PLACEHOLDERS | CLUSTER_PLACEHOLDERS):
        assert re.search(rf"^\s*export {name}=", docs, re.M), f"docs/deployment.md never sets {name}"
        assert re.search(rf"`\$\{{?{name}\}}?`", docs), f"docs/deployment.md never explains {name}"
    for path in ("k8s/rayjob.yaml", "k8s/checkpoint-converter.yaml", "cluster.yaml", "Dockerfile"):
        assert path in docs, path


# ------------------------------------------------------------------------------------------------
# 2. cluster.yaml (ray up)


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER, SAMPLE_VALUES)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # ray-schema.json + the launcher's own consistency checks
    assert prepared["provider"]["type"] == "gcp" and prepared["provider"]["project_id"] == "my-project"
    assert prepared["provider"]["availability_zone"].startswith(prepared["provider"]["region"])

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "converters must not run on the head"
    workers = [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert sum(t["min_workers"] for t in workers) == prepared["max_workers"] == sum(t["max_workers"] for t in workers)
    budget = float(flags_of(rayjob_argv(load(RAYJOB))[2:])["--worker_memory_gb"]) * GiB
    for node_type in types.values():
        node = node_type["node_config"]
        assert node["machineType"] in MACHINES
        # Without explicit service accounts the workers get read-only storage scope.
        accounts = node["serviceAccounts"]
        assert accounts and all("https://www.googleapis.com/auth/cloud-platform" in a["scopes"] for a in accounts)
        assert accounts[0]["email"] == "ray-autoscaler-sa-v1@my-project.iam.gserviceaccount.com"
    for node_type in workers:
        res = node_type["resources"]
        assert int(res["memory"] // budget) == 1 and res["CPU"] >= 1, "one converter per VM, as in the RayJob"
        # A plain VM keeps ~10% for the OS, Ray's own processes and the object store.
        assert res["memory"] <= 0.85 * MACHINES[node_type["node_config"]["machineType"]][1] * GiB

    # rayconv's own files are shipped and installed with the lock's pins on every node.
    for remote, local in prepared["file_mounts"].items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist in the repo"
    setup = " ; ".join(prepared["setup_commands"])
    assert "--constraint ~/rayconv/requirements/main.lock" in setup and '"$HOME/rayconv[gcs]"' in setup
    assert any(str(p) == "./requirements" or str(p).endswith("main.lock") for p in prepared["file_mounts"].values())
    starts = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "rayconv-venv/bin" in starts


def test_docs_give_the_ray_up_lifecycle():
    docs = DOCS.read_text()
    for command in ("ray up", "ray dashboard", "ray job submit", "ray down"):
        assert command in docs, command


# ------------------------------------------------------------------------------------------------
# 3. Dockerfile


def test_dockerfile_pins_ray_and_installs_from_the_repo():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        assert keyword == "ARG", f"{keyword} before FROM"
        name, _, default = rest.partition("=")
        args[name] = default
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], froms[0])
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cpu", image)
    assert m, f"base image {image!r} must pin an exact rayproject/ray release"
    ray_version = m[1]
    assert ray_version == lock_pins()["ray"], "image Ray != requirements/main.lock"
    assert ray_version == load(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"], "image Ray != RayJob rayVersion"
    assert (int(m[2]), int(m[3])) >= (3, 11), "rayconv needs Python >= 3.11"

    copies = [shlex.split(rest) for keyword, rest in instructions if keyword == "COPY"]
    sources = {src.rstrip("/") for c in copies for src in [a for a in c if not a.startswith("--")][:-1]}
    assert {"pyproject.toml", "rayconv", "requirements/main.lock"} <= sources
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if isinstance(project.get("readme"), str):
        assert project["readme"] in sources, "pyproject's readme must be in the image for `pip install .`"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
        assert not dockerignore_excludes(ignore, source), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            for path in (ROOT / source).rglob("*.py"):
                assert not dockerignore_excludes(ignore, str(path.relative_to(ROOT)))
    assert dockerignore_excludes(ignore, ".venvs") and dockerignore_excludes(ignore, "tests/test_deploy.py")

    runs = " ; ".join(rest for keyword, rest in instructions if keyword == "RUN")
    install = re.search(r"pip install ([^;&]*)", runs)
    assert install, "no pip install step"
    words = shlex.split(install[1])
    assert "--constraint" in words and words[words.index("--constraint") + 1] == "requirements/main.lock"
    assert any(w == "." or w.startswith(".[") for w in words), "must install the repo itself (pip install .)"
    assert "rayconv convert --help" in runs, "the build should prove the console script works"

    # Every runtime dependency is pinned by the lock, so the image gets exactly what CI tested.
    pins = lock_pins()
    for requirement in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()
        assert name in pins, f"{requirement} is not pinned in requirements/main.lock"


# ------------------------------------------------------------------------------------------------
# 4. End to end: the RayJob's entrypoint on a local Ray cluster (tests/ray_cluster.py)


def kuberay_submitter_command(address: str, submission_id: str, entrypoint: str) -> str:
    """What KubeRay v1.7.0's K8sJobMode submitter runs (common/job.go BuildJobSubmitCommand), minus the
    dashboard health wait: a bash script around ``ray job submit``, with the entrypoint pasted in verbatim."""
    return " ".join([
        "if", "!", "ray", "job", "status", "--address", address, submission_id, ">/dev/null", "2>&1", ";", "then",
        "ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", submission_id,
        "--", entrypoint.strip(), ";", "fi", ";",
        "ray", "job", "logs", "--address", address, "--follow", submission_id,
    ])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rayjob_entrypoint_runs_on_a_local_ray_cluster():
    from rayconv.storage import Location
    from rayconv.synthetic import PRESETS, write_checkpoint
    from servers import FakeGcs, SignedUrlServer

    rayjob = load(RAYJOB)
    flags = flags_of(rayjob_argv(rayjob)[2:])
    cluster = rayjob["spec"]["rayClusterSpec"]
    # One local node with the logical resources of the RayJob's whole cluster (head + worker pods), so the
    # entrypoint's --num_workers / --worker_memory_gb schedule exactly as they would on GKE.
    groups = [(1, cluster["headGroupSpec"])] + [(g["replicas"], g) for g in cluster["workerGroupSpecs"]]
    num_cpus = sum(n * int(g["rayStartParams"]["num-cpus"]) for n, g in groups)
    memory = sum(n * quantity_bytes(g["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
                 for n, g in groups)

    model = PRESETS["demo"]  # llama-3.1, 16 shards with the 405B kv-head repetition
    assert flags["--model_path"] == "Llama3.1-405B-Instruct:bf16-mp16" and model.n_shards == 16
    work = Path(tempfile.mkdtemp(prefix="rcdeploy-e2e-"))
    bucket = f"rayconv-e2e-{secrets.token_hex(3)}"
    ray_cluster = None
    try:
        # Meta's CloudFront layout: <folder>/<file>, folder from the descriptor (Llama-3.1-405B-Instruct-MP16).
        write_checkpoint(model, work / "meta" / "Llama-3.1-405B-Instruct-MP16")
        with FakeGcs() as gcs, SignedUrlServer(work / "meta") as meta:
            gcs.create_bucket(bucket)
            # The synthetic shards are not Meta's published 405B sizes: size-check them against Content-Range.
            env = {**os.environ, **gcs.env(), "RAYCONV_META_SHARD_SIZES": "ignore",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
            ray_cluster = LocalRayCluster(num_cpus=num_cpus, memory=memory, env=env).start()

            entrypoint = envsubst(rayjob["spec"]["entrypoint"], {"BUCKET_NAME": bucket, "META_URL": meta.url()})
            assert not placeholders(entrypoint)
            submission_id = f"rayconv-e2e-{secrets.token_hex(4)}"
            script = kuberay_submitter_command(ray_cluster.address, submission_id, entrypoint)
            started = time.monotonic()
            submit = subprocess.run(["/bin/bash", "-ce", "--", script], env=env, capture_output=True, text=True,
                                    timeout=1200)
            elapsed = time.monotonic() - started

            from ray.job_submission import JobStatus, JobSubmissionClient

            client = JobSubmissionClient(ray_cluster.address)
            status = client.get_job_status(submission_id)
            logs = client.get_job_logs(submission_id)
            print(f"job {submission_id}: {status} after {elapsed:.0f} s\n{logs[-4000:]}")
            assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
            assert status == JobStatus.SUCCEEDED, logs[-6000:]
            assert client.get_job_info(submission_id).entrypoint.startswith("rayconv convert --bucket_name=")

            out = f"gs://{bucket}/maxtext/llama-3.1-405b"
            assert f"Completed unscanning checkpoint to {out}/bf16/unscanned/checkpoints/0/items" in logs
            assert f"Completed quantizing model llama3.1-405b with int8 to {out}/int8" in logs
            # rayconv never logs the signature (Ray's own first line echoes the entrypoint, URL included).
            signature = re.search(r"Signature=([^&]+)", meta.url())[1]
            leaks = [line for line in logs.splitlines()
                     if signature in line and not line.startswith("Running entrypoint for job")]
            assert not leaks, leaks
            with gcs.environment():
                root = Location.parse(out)
                for item in ("bf16/scanned/0/items", "bf16/unscanned/checkpoints/0/items"):
                    assert root.exists(f"{item}/commit_success.txt"), item
                    assert root.exists(f"{item}/_METADATA"), item
                assert root.exists("int8/_METADATA")
            # Meta's URL was really used (16 shards fetched), not a cached copy.
            assert len(meta.file_requests("Llama-3.1-405B-Instruct-MP16/consolidated.15.pth")) >= 1
    finally:
        if ray_cluster is not None:
            ray_cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_installing_prints_no_setuptools_deprecation():
    """pyproject.toml as setuptools applies it when installing: no deprecation banner (issue 21: the
    ``project.license`` table printed one on every install; an SPDX string is what PEP 639 asks for)."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert not [str(w.message) for w in caught], [str(w.message)[:200] for w in caught]
