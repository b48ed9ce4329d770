"""``rayconv plan``: the plan convert would run, what it reads and writes, and how long it should take.

``--simulate`` builds the same plan from a descriptor's published dimensions with synthetic shard
indexes (tensor byte ranges laid out as torch.save lays them), so the 405B plan can be inspected
on a laptop.

The wall-time estimate is a bottleneck model of a streaming job, with every rate a parameter
(:class:`Environment`, defaults documented in docs/benchmarks.md):

* **compute**: each worker converts at the measured input MB per CPU-second (:data:`MB_PER_CPU_SECOND`, the
  efficiency row of scripts/bench.py) times the cores it has (:data:`CORES_PER_WORKER`): where the network and
  the disks keep up, CPU is the limit, and what the job costs. Units are dealt out dynamically, so the slowest
  worker gets at most one unit more than its share;
* **read**: from GCS, limited by the VMs' network (workers are packed ``workers_per_vm`` to a VM) and the
  bucket's bandwidth quota; from Meta's signed URL, by CloudFront's per-connection rate times the
  connections the workers open, and the VMs' network;
* **write**: 2.5x the input (three outputs), limited by the VMs' network and the bucket's initial
  object-write rate (each commit writes a data file and a manifest per unit database);
* **manifest writes**: each OCDBT commit rewrites its unit databases' ``manifest.ocdbt`` (one object name per
  database), and Cloud Storage accepts about one write per second to one object name. The commits are the
  worker's own rule (:func:`rayconv.job.commit_batch_bytes`, checked after each piece) replayed over the plan;
  the output kinds' databases are different objects written in parallel, a unit's commits follow each other;
* **fixed**: starting Ray and the workers, the commits, shutting down (measured; scale-up of a
  cluster is not included).

Reading, converting and writing overlap (each worker reads a unit while the previous one is written),
so the estimate is the slowest of the three plus the fixed part, and the report names the bottleneck.
They are estimates, labelled so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from rayconv import families, mapping
from rayconv.job import (MEMORY_PER_PIECE_BYTE, WORKER_BASE_BYTES, ConvertOptions, GiB, batch_reserve_bytes,
                         commit_batch_bytes, make_plan, open_checkpoint, piece_budget, worker_memory_bytes)
from rayconv.models import ModelSpec
from rayconv.plan import Plan, describe, piece_rows
from rayconv.simulated import simulated_checkpoint

#: Input MB converted per CPU-second (read + transform + write all three outputs + CRC; user + sys of the whole
#: process tree): the efficiency row of scripts/bench.py (--preset narrow, local executor, output on tmpfs, input
#: warm): 170-210 on a quiet machine (2026-12-06), and 181-213 (narrow) / 155-199 (real widths) on 2026-12-07
#: with issue 24's kernels, which measured no faster than the old code on a quiet machine (docs/benchmarks.md).
#: The real-width runs' 58-104 MB/s per worker were bound by this machine's disk, not by the CPU.
MB_PER_CPU_SECOND = 190.0
#: Cores each worker converts with: a Ray worker actor reserves one CPU (rayconv.engine.executors) and runs its
#: units one after another.
CORES_PER_WORKER = 1
#: Per-worker conversion rate, input MB/s: the compute term of the estimate. Override with --throughput_mb_s.
DEFAULT_WORKER_MB_S = MB_PER_CPU_SECOND * CORES_PER_WORKER
#: VM network bandwidths the report says how many workers fill, Gbit/s each direction (GCE: 32 by default for
#: 16+ vCPU N2/C3 VMs, 100 with Tier_1 networking), plus --vm_gbps.
NETWORK_TIERS_GBPS = (32.0, 100.0)
#: Fixed seconds of a run (Ray and worker start, shutdown), measured on narrow fixtures; docs/benchmarks.md.
DEFAULT_FIXED_SECONDS = 6.0
#: Commit seconds per unit database (grafting its OCDBT root into each output), measured locally.
COMMIT_SECONDS_PER_UNIT = 0.01
#: Objects one OCDBT commit writes per database: a data file (its chunks and b-tree nodes) and the manifest
#: (a local conversion's unit databases: one data file per OCDBT generation, e.g. 17-18 files for 18).
OBJECTS_PER_COMMIT = 2
#: Worker counts the estimate table shows (plus --num_workers when given).
WORKER_COUNTS = (8, 16, 32)
#: The GKE tutorial's reported time for downloading and converting Llama 3.1 405B.
TUTORIAL_HOURS = (9, 10)


@dataclasses.dataclass(frozen=True)
class Environment:
    """The rates the estimate scales; every field is a `rayconv plan` flag (docs/benchmarks.md cites each default)."""

    #: Per-worker conversion rate, input MB/s (MB_PER_CPU_SECOND × CORES_PER_WORKER: DEFAULT_WORKER_MB_S).
    worker_mb_s: float = DEFAULT_WORKER_MB_S
    #: Workers per VM: one core per worker, 16 on a 16-vCPU VM (n2-highmem-16, 128 GB, holds 16 workers of 4 GiB,
    #: or of the default 1 GiB).
    workers_per_vm: int = 16
    #: Network bandwidth of one VM, each direction, Gbit/s (GCE's default tier for 16+ vCPU N2/C3 VMs: 32).
    vm_gbps: float = 32.0
    #: Cloud Storage Google-egress bandwidth quota of the bucket's region (project default: 200 Gbit/s).
    gcs_read_gbps: float = 200.0
    #: Object writes per second a new bucket accepts before it scales up (Cloud Storage: ~1000).
    gcs_writes_per_s: float = 1000.0
    #: Writes per second to one object name (Cloud Storage's documented limit: 1). Every OCDBT commit rewrites
    #: its databases' manifest.ocdbt; a unit commits when a piece ends with a batch of output staged
    #: (rayconv.job.commit_batch_bytes: 256 MiB on gs://).
    gcs_object_writes_per_s: float = 1.0
    #: Rate of one connection to Meta's CloudFront signed URL, MB/s (not measurable here: an assumption).
    meta_mb_s: float = 50.0
    #: Ranged GETs each worker keeps open on the signed URL (RAYCONV_HTTP_CONCURRENCY, default 8).
    meta_connections_per_worker: int = 8
    #: Where the shards are read from: "gcs" (staged in a bucket), "meta" (streamed from the signed URL),
    #: "local" (a local disk: not modelled, compute-bound).
    source: str = "gcs"
    #: Where the outputs go: "gcs" (network and object limits apply) or "local" (not modelled).
    destination: str = "gcs"
    #: Seconds that do not depend on the model size (Ray start, workers start, shutdown).
    fixed_seconds: float = DEFAULT_FIXED_SECONDS

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gbps(gbit: float) -> float:
    return gbit * 1e9 / 8


def output_bytes(plan: Plan) -> dict[str, dict[str, int]]:
    """Arrays and bytes of each output (what the workers write; the commit adds only metadata)."""
    return {kind.name: {"arrays": len(arrays), "bytes": sum(a.nbytes for a in arrays)}
            for kind, arrays in ((k, plan.arrays(k)) for k in plan.kinds)}


def largest_piece(plan: Plan) -> int:
    return max((p.nbytes for u in plan.units for p in u.pieces), default=0)


def largest_piece_for(spec: ModelSpec, budget: int) -> int:
    """Bytes of the largest piece the planner cuts with piece budget ``budget`` (bf16 rows; FP8 pieces are smaller).

    Uses the planner's own cutting rule (:func:`rayconv.plan.piece_rows`) per tensor without building the
    plan, which at small budgets has hundreds of thousands of pieces."""
    largest = 0
    for rule in families.rules(spec):
        shape = mapping.global_shape(rule, spec)
        rows = piece_rows(rule, spec, budget)
        largest = max(largest, rows * math.prod(shape[1:]) * 2)
    return largest


def smallest_worker_memory_gb(spec: ModelSpec, step_gb: float = 0.01, output: str = "") -> float:
    """The smallest --worker_memory_gb whose largest piece still fits the worker (largest piece × 8 + base, plus
    the commit batches on a gs:// ``output``).

    Pieces shrink with the budget down to the smallest block a tensor can be cut into (whole heads for
    q/k/v, one row otherwise; replicated norms are never cut), so below some budget the largest piece
    stops shrinking while the worker keeps shrinking. Binary search over budgets in ``step_gb`` steps: the
    largest piece only grows with the budget, so "fits" is monotone."""
    def fits(steps: int) -> bool:
        gb = steps * step_gb
        options = ConvertOptions(files={}, input_display="", output=output, worker_memory_gb=gb)
        return gb * GiB > WORKER_BASE_BYTES and worker_memory_bytes(
            largest_piece_for(spec, piece_budget(options)), batch_reserve_bytes(options)) <= gb * GiB

    lo, hi = int(WORKER_BASE_BYTES / GiB / step_gb), int(4 / step_gb)
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return round(hi * step_gb, 2)


def unit_commits(plan: Plan, written: int, batch_bytes: int) -> list[int]:
    """Commits of each unit: the worker's rule (``sink.ocdbt_writer.OcdbtWriter.piece_done``) replayed over the plan's pieces.

    A unit commits when a piece ends with at least ``batch_bytes`` of output staged, and once more for the rest
    (``flush``), so a piece larger than the batch commits on its own. Output per piece is approximated as the
    piece's bytes × the plan's output/input ratio (~2.5 for scanned + unscanned + int8)."""
    per_byte = written / max(1, sum(u.nbytes for u in plan.units))
    counts = []
    for unit in plan.units:
        staged, commits = 0.0, 0
        for piece in unit.pieces:
            staged += piece.nbytes * per_byte
            if staged >= batch_bytes:
                commits, staged = commits + 1, 0.0
        counts.append(commits + (staged > 0))
    return counts


def network_saturation(bytes_read: int, written: int, env: Environment) -> list[dict[str, Any]]:
    """How many workers, each converting at ``env.worker_mb_s``, fill one VM's network (each direction apart:
    reading the input from GCS or the signed URL in, writing ``written / bytes_read`` as much output to GCS out)
    at each of :data:`NETWORK_TIERS_GBPS` and ``env.vm_gbps``. ``workers`` is None when neither side is on the
    network (a local input and output)."""
    rate = env.worker_mb_s * 1e6
    flows = {"read": rate if env.source in ("gcs", "meta") else 0.0,
             "write": rate * written / max(1, bytes_read) if env.destination == "gcs" else 0.0}
    direction = max(flows, key=lambda k: flows[k])
    per_worker = flows[direction]
    return [{"vm_gbps": gbps, "workers": round(_gbps(gbps) / per_worker, 1) if per_worker else None,
             "direction": direction if per_worker else None, "per_worker_mb_s": round(per_worker / 1e6, 1)}
            for gbps in sorted({*NETWORK_TIERS_GBPS, env.vm_gbps})]


def estimate(plan: Plan, written: int, workers: int, env: Environment, batch_bytes: int,
             commits: list[int] | None = None) -> dict[str, Any]:
    """Seconds for ``workers`` workers: compute, read and write bounds, and the estimate (slowest + fixed).

    ``batch_bytes``: the commit batch convert uses for this destination (:func:`rayconv.job.commit_batch_bytes`);
    ``commits``: :func:`unit_commits` for it (computed when not given)."""
    vms = math.ceil(workers / max(1, env.workers_per_vm))
    largest_unit = max((u.read_bytes for u in plan.units), default=0)
    compute = (plan.input_bytes / workers + largest_unit) / (env.worker_mb_s * 1e6)
    if env.source == "meta":
        read_rate = min(workers * env.meta_connections_per_worker * env.meta_mb_s * 1e6, vms * _gbps(env.vm_gbps))
    elif env.source == "gcs":
        read_rate = min(vms * _gbps(env.vm_gbps), _gbps(env.gcs_read_gbps))
    else:
        read_rate = math.inf
    bounds = {"compute": compute, "read": plan.input_bytes / read_rate, "write": 0.0, "manifest writes": 0.0}
    if env.destination == "gcs":
        commits = unit_commits(plan, written, batch_bytes) if commits is None else commits
        objects = sum(commits) * len(plan.kinds) * OBJECTS_PER_COMMIT
        bounds["write"] = max(written / (vms * _gbps(env.vm_gbps)), objects / env.gcs_writes_per_s)
        # Each of a unit's commits rewrites the same manifests (one object name per database, i.e. per unit and
        # kind; the kinds' are different objects, written in parallel), which opening the databases created at
        # the unit's start: a commit waits for the per-object rate. A worker's units run one after another; units
        # are dealt out dynamically, so the slowest worker gets at most one unit more than its share.
        bounds["manifest writes"] = (sum(commits) / workers + max(commits, default=0)) / env.gcs_object_writes_per_s
    bottleneck = max(bounds, key=lambda k: bounds[k])
    fixed = env.fixed_seconds + COMMIT_SECONDS_PER_UNIT * len(plan.units) * len(plan.kinds)
    total = bounds[bottleneck] + fixed
    return {"workers": workers, "vms": vms, "bytes_per_worker": int(plan.input_bytes / workers + largest_unit),
            "compute_seconds": round(compute, 1), "read_seconds": round(bounds["read"], 1),
            "write_seconds": round(bounds["write"], 1), "manifest_seconds": round(bounds["manifest writes"], 1),
            "fixed_seconds": round(fixed, 1),
            "bottleneck": bottleneck, "estimated_seconds": round(total, 1), "estimated_hours": round(total / 3600, 2)}


def report(plan: Plan, options: ConvertOptions, env: Environment, extra_workers: int | None = None) -> dict[str, Any]:
    """Everything `rayconv plan` prints: the plan, bytes per output, worker memory, estimates."""
    outputs = output_bytes(plan)
    written = sum(o["bytes"] for o in outputs.values())
    largest = largest_piece(plan)
    counts = sorted(set(WORKER_COUNTS) | ({extra_workers} if extra_workers else set()))
    # The estimate's destination decides the batch (a simulated plan given no output is estimated for GCS).
    batch = commit_batch_bytes(options, gcs=env.destination == "gcs")
    commits = unit_commits(plan, written, batch)
    return {
        "plan": describe(plan),
        "outputs": outputs,
        "bytes_read": plan.input_bytes,
        "bytes_written": written,
        "worker_memory_budget_gb": options.worker_memory_gb,
        "piece_budget_bytes": piece_budget(options),
        "peak_memory_per_worker_bytes": worker_memory_bytes(largest, batch_reserve_bytes(options)),
        "batch_reserve_bytes": batch_reserve_bytes(options),
        "commit_batch_bytes": batch,
        "commits": sum(commits),
        "smallest_worker_memory_gb": smallest_worker_memory_gb(plan.spec, output=options.output),
        "per_worker_throughput_mb_s": env.worker_mb_s,
        "compute_model": {"mb_per_cpu_second": MB_PER_CPU_SECOND, "cores_per_worker": CORES_PER_WORKER,
                          "per_worker_mb_s": env.worker_mb_s, "from_cpu_rate": env.worker_mb_s == DEFAULT_WORKER_MB_S,
                          "source": "input MB per CPU-second of scripts/bench.py's efficiency row (--preset narrow)"},
        "network_saturation": network_saturation(plan.input_bytes, written, env),
        "environment": env.as_dict(),
        "estimates": [estimate(plan, written, n, env, batch, commits) for n in counts],
        "tutorial_hours": list(TUTORIAL_HOURS),
        "note": "estimates: the slowest of compute (measured MB per CPU-second × cores per worker), read and write "
                "(network and "
                "storage limits from the environment) plus fixed costs; see docs/benchmarks.md",
    }


def simulate(options: ConvertOptions, env: Environment | None = None) -> dict[str, Any]:
    """The report for ``options.model_path``'s published dimensions, planned by the code convert runs."""
    checkpoint = simulated_checkpoint(options.model_name, options.model_path)
    plan = make_plan(checkpoint, options)
    source = {"source_sku": "fp8"} if checkpoint.fp8 else {}
    return {"simulated": True, **source,
            **report(plan, options, env or Environment(), options.num_workers)}


def report_for_files(options: ConvertOptions, env: Environment | None = None) -> dict[str, Any]:
    """The report for the real input ``options.files`` (reads the shard indexes, not the tensors)."""
    checkpoint = open_checkpoint(options)
    plan = make_plan(checkpoint, options)
    return {"simulated": False, **report(plan, options, env or Environment(), options.num_workers)}


def render(report_: dict[str, Any]) -> Any:
    """The report as rich renderables: plan summary, outputs, estimates, assumptions."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rayconv.progress import human_bytes

    plan, env = report_["plan"], report_["environment"]
    head = Table(title=f"rayconv plan: {plan['model']}" + (" (simulated from published dimensions)"
                                                           if report_["simulated"] else ""),
                 show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("input", f"{plan['shards']} shards" + (" (Meta FP8 SKU)" if report_.get("source_sku") == "fp8" else "")),
        ("outputs", ", ".join(plan["outputs"])),
        ("units / pieces", f"{plan['units']:,} / {plan['pieces']:,}"),
        ("bytes read", f"{human_bytes(report_['bytes_read'])} (once, for all outputs)"),
        ("bytes written", human_bytes(report_["bytes_written"])),
        ("largest piece", f"{human_bytes(plan['largest_piece_bytes'])} (piece budget "
                          f"{human_bytes(report_['piece_budget_bytes'])})"),
        ("largest unit", human_bytes(plan["largest_unit_bytes"])),
        ("memory per worker", f"{human_bytes(report_['peak_memory_per_worker_bytes'])} peak of a "
                              f"{report_['worker_memory_budget_gb']:g} GiB budget (largest piece × "
                              f"{MEMORY_PER_PIECE_BYTE} + {WORKER_BASE_BYTES >> 20} MiB" +
                              (f" + 2 commit batches of {human_bytes(report_['batch_reserve_bytes'] // 2)})"
                               if report_["batch_reserve_bytes"] else ")")),
        ("smallest worker", f"--worker_memory_gb {report_['smallest_worker_memory_gb']:g} still holds the "
                            "largest piece"),
        ("fingerprint", plan["fingerprint"]),
    ]
    for name, value in rows:
        head.add_row(name, value)

    outs = Table(title="per output", title_justify="left")
    for col in ("output", "arrays", "bytes written"):
        outs.add_column(col, justify="left" if col == "output" else "right")
    for kind, o in report_["outputs"].items():
        outs.add_row(kind, f"{o['arrays']:,}", human_bytes(o["bytes"]))

    est = Table(title=f"estimated wall time (source: {env['source']}, outputs: {env['destination']}; the tutorial reports "
                      f"{TUTORIAL_HOURS[0]}–{TUTORIAL_HOURS[1]} hours)", title_justify="left")
    for col in ("workers", "VMs", "compute", "read", "write", "manifests", "fixed", "estimate", "bottleneck"):
        est.add_column(col, justify="right" if col != "bottleneck" else "left")
    for e in report_["estimates"]:
        est.add_row(str(e["workers"]), str(e["vms"]), _duration(e["compute_seconds"]), _duration(e["read_seconds"]),
                    _duration(e["write_seconds"]), _duration(e["manifest_seconds"]), _duration(e["fixed_seconds"]),
                    Text(_duration(e["estimated_seconds"]), style="bold"), e["bottleneck"])
    compute = report_["compute_model"]
    rate = (f"{env['worker_mb_s']:g} MB/s per worker ({compute['mb_per_cpu_second']:g} MB of input per CPU-second, "
            f"measured by scripts/bench.py's efficiency row, × {compute['cores_per_worker']:g} core per worker; "
            "--throughput_mb_s)" if compute["from_cpu_rate"] else f"{env['worker_mb_s']:g} MB/s per worker "
            "(--throughput_mb_s)")
    assumptions = Text(
        f"assumptions: {rate}, "
        f"{env['workers_per_vm']} workers per VM (--workers_per_vm), {env['vm_gbps']:g} Gbit/s per VM (--vm_gbps), "
        f"GCS {env['gcs_read_gbps']:g} Gbit/s read quota (--gcs_read_gbps), {env['gcs_writes_per_s']:g} "
        f"object writes/s (--gcs_writes_per_s) and {env['gcs_object_writes_per_s']:g} write/s per object name "
        f"(--gcs_object_writes_per_s; {report_['commits']:,} commits of ≥ {report_['commit_batch_bytes'] >> 20} MiB "
        "or one piece, each rewriting its unit's manifests), "
        f"Meta URL {env['meta_mb_s']:g} MB/s per connection × "
        f"{env['meta_connections_per_worker']} per worker (--meta_mb_s), {env['fixed_seconds']:g} s fixed. "
        "Estimates, not measurements: docs/benchmarks.md.", style="dim")
    return Group(head, outs, est, Text(network_line(report_["network_saturation"], env["workers_per_vm"])),
                 assumptions)


def network_line(saturation: list[dict[str, Any]], workers_per_vm: int) -> str:
    """One line: how many workers fill a VM's network at each bandwidth (:func:`network_saturation`)."""
    if saturation[0]["workers"] is None:
        return "network: input and outputs are local, no VM network is crossed"
    first = saturation[0]
    flow = f"{first['per_worker_mb_s']:g} MB/s each, " + ("reading the input" if first["direction"] == "read"
                                                         else "writing the outputs")
    fills = ", ".join(f"{s['workers']:g} workers fill {s['vm_gbps']:g} Gbit/s" for s in saturation)
    return f"network per VM ({flow}): {fills}; {workers_per_vm} per VM in this estimate (--workers_per_vm)"


def _duration(seconds: float) -> str:
    if seconds == math.inf:
        return "∞"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_for(workers: Sequence[int], plan: Plan, env: Environment, batch_bytes: int) -> list[dict[str, Any]]:
    """Estimates for arbitrary worker counts (scripts/bench.py, docs); ``batch_bytes``: the commit batch."""
    written = sum(o["bytes"] for o in output_bytes(plan).values())
    commits = unit_commits(plan, written, batch_bytes)
    return [estimate(plan, written, n, env, batch_bytes, commits) for n in workers]
