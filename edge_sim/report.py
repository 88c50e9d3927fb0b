"""The simulator's report, for runs of either transport: ``results.json``, ``report.md`` and PNG
plots from the recorded runs.

The headline measure is the *excess error after the drift*: the target's served errors above its
own pre-drift level (the mean of the 10 batches before the drift), summed over the
``post_drift_batches`` after it, divided by isolated learning's on the same seed (0: the drift
cost nothing; 1: no better than learning alone). Adaptability follows the paper: batches from the drift onset until the target's served rolling
error reaches FedAvg's mean error (same seed). Where a scenario runs no FedAvg, and always beside
it, the pre-drift definition is given too: batches until the rolling error is back within the
scenario's ``recovery_tolerance`` of the 10 batches before the drift. Over MQTT, bytes are the
agents' own counts of real MQTT payloads; in process, the KT blobs' and FedAvg messages' sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sim.datasets.sources import describe
from edge_sim.inputs import scenario_workload
from edge_sim.records import ModeRun, NodeRecord, run_dict
from edge_sim.scenario import Scenario

#: Byte classes per operation, as the paper's Table 1 splits them.
OPERATIONS = {"metadata": "meta", "mds_query": "query", "kt": "kt", "fl": "fl"}

#: What ran the fleet, in the report's words.
TRANSPORTS = {
    "mqtt": "real clue-agent/clue-mds processes over Mosquitto",
    "inprocess": "the same learners in one process, no MQTT",
}
BYTES_COUNTED = {"mqtt": "as counted by its MQTT client", "inprocess": "the sizes of the KT blobs and FedAvg messages"}


def adaptability(errors: Sequence[float], drift_at: int, *, window: int, tolerance: float, pre_drift: float) -> tuple[int, bool]:
    """Batches from the drift onset until the rolling error is back within ``tolerance`` of ``pre_drift``.

    Returns (batches, recovered); a run that never recovers counts every post-drift batch.
    """
    for t in range(drift_at, len(errors)):
        lo = max(drift_at, t - window + 1)
        if t - lo + 1 < window:
            continue
        if float(np.mean(errors[lo : t + 1])) <= pre_drift + tolerance:
            return t - drift_at + 1, True
    return len(errors) - drift_at, False


def excess_error(errors: Sequence[float], drift_at: int, *, pre_drift: float, batches: int) -> float:
    """Sum over the ``batches`` after the drift of the served error above ``pre_drift`` (never below 0 a batch)."""
    after = np.asarray(errors[drift_at : drift_at + batches], dtype=float)
    return float(np.nansum(np.clip(after - pre_drift, 0.0, None)))


def _class_error(rec: NodeRecord, start: int, stop: int, classes: Sequence[int]) -> float:
    """Mean served error on ``classes`` over batches [start, stop)."""
    errs = [e[c] for e in rec.class_errors[start:stop] for c in classes if c in e]
    return float(np.mean(errs)) if errs else math.nan


def _window(scn: Scenario) -> int:
    return int(scn.learner.get("drift", {}).get("window", 3))


def _rolling_mean(values: Sequence[float], w: int) -> list[float]:
    return [float(np.nanmean(values[max(0, i - w + 1) : i + 1])) for i in range(len(values))]


def _ms(values: Sequence[float | None]) -> tuple[float, float]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return (float(np.mean(v)), float(np.std(v))) if v else (math.nan, math.nan)


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    return "—" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _collab_bytes(run: ModeRun) -> dict[str, dict[str, float]]:
    """Per node: bytes out/in of each collaboration operation."""
    out = {}
    for node, rec in run.nodes.items():
        out[node] = {f"{op}_{d}": float(rec.stats.get(f"{cls}_{d}", 0.0)) for op, cls in OPERATIONS.items() for d in ("out", "in")}
    return out


def summarise(scn: Scenario, runs: Sequence[ModeRun]) -> dict[str, Any]:
    """Per mode: adaptability (both definitions), errors, bytes, overheads — mean ± std over seeds."""
    window = _window(scn)
    d = scn.drift_at
    fedavg_mean = {}
    for r in runs:
        if r.mode == "fedavg":
            fedavg_mean[r.seed] = float(np.nanmean(r.target.served_error[d:]))
    per_mode: dict[str, Any] = {}
    for mode in dict.fromkeys(r.mode for r in runs):
        rs = [r for r in runs if r.mode == mode]
        rows = []
        for r in rs:
            workload = scenario_workload(scn, r.num_classes, r.seed)
            # Classes of the target's that the helpers never saw (non-overlapping helpers): what a helper can break.
            unseen = [c for c in workload.target_classes if c not in workload.helper_classes]
            errs = r.target.served_error
            pre = float(np.nanmean(errs[max(0, d - 10) : d]))
            adapt_pre, _ = adaptability(errs, d, window=window, tolerance=scn.recovery_tolerance, pre_drift=pre)
            adapt_fl = None
            if r.seed in fedavg_mean:
                adapt_fl, _ = adaptability(errs, d, window=window, tolerance=0.0, pre_drift=fedavg_mean[r.seed])
            stop = min(len(errs), d + scn.post_drift_batches)
            target_bytes = _collab_bytes(r)
            node0 = next(iter(target_bytes.values()))
            system = {k: sum(v[k] for v in target_bytes.values()) for k in node0}
            stats = r.target.stats
            helper_stats = [n.stats for n in r.nodes.values() if n.stats.get("pick_n")]
            batch_ms = float(np.mean([n.stats.get("batch_ms", math.nan) for n in r.nodes.values()]))
            pick_ms = float(np.mean([s["pick_ms"] for s in helper_stats])) if helper_stats else math.nan
            installs = [e for e in r.target.events if e["kind"] == "helper_installed"]
            rows.append({
                "seed": r.seed,
                "complete": r.complete,
                "pre_drift_error": pre,
                "post_drift_error": float(np.nanmean(errs[d:stop])),
                "excess_error": excess_error(errs, d, pre_drift=pre, batches=scn.post_drift_batches),
                "new_classes": list(workload.new_classes),
                "new_class_error": _class_error(r.target, d, stop, workload.new_classes),
                "unseen_class_error": _class_error(r.target, d, stop, unseen) if unseen else None,
                "adaptability_pre_drift": adapt_pre,
                "adaptability_fedavg": adapt_fl,
                "target_bytes": node0,
                "system_bytes": system,
                "collab_bytes_target": sum(node0.values()),
                "collab_bytes_system": sum(system.values()),
                "batch_ms": batch_ms,
                "pick_over_batch": pick_ms / batch_ms if batch_ms else math.nan,
                "install_over_batch": stats.get("install_ms", math.nan) / batch_ms if stats.get("install_n") else math.nan,
                "drift_to_helper_batches": installs[0]["batches"] if installs else None,
                "drift_to_helper_ms": installs[0]["ms"] if installs else None,
                "kt_transfers": len(installs),
                "seconds": r.seconds,
            })
        per_mode[mode] = {"runs": rows}
    iso = {row["seed"]: row for row in per_mode.get("isolated", {}).get("runs", [])}
    fed = {row["seed"]: row for row in per_mode.get("fedavg", {}).get("runs", [])}
    for entry in per_mode.values():
        rows = entry["runs"]

        def ratio(key: str, base: dict, row: dict) -> float | None:
            b = base.get(row["seed"], {}).get(key)
            v = row.get(key)
            return b / v if b is not None and v else None

        def over_isolated(key: str, row: dict) -> float | None:
            b = iso.get(row["seed"], {}).get(key)
            return row[key] / b if b else None

        entry.update({
            "excess_over_isolated": _ms([over_isolated("excess_error", r) for r in rows]),
            "excess_error": _ms([r["excess_error"] for r in rows]),
            "adaptability_fedavg": _ms([r["adaptability_fedavg"] for r in rows]),
            "adaptability_pre_drift": _ms([r["adaptability_pre_drift"] for r in rows]),
            "ratio_isolated_over_mode": _ms([ratio("adaptability_fedavg", iso, r) for r in rows]) if fed else _ms([ratio("adaptability_pre_drift", iso, r) for r in rows]),
            "post_drift_error": _ms([r["post_drift_error"] for r in rows]),
            "pre_drift_error": _ms([r["pre_drift_error"] for r in rows]),
            "new_class_error": _ms([r["new_class_error"] for r in rows]),
            "unseen_class_error": _ms([r["unseen_class_error"] for r in rows]),
            "transfer_ratio_fedavg_over_mode_target": _ms([ratio("collab_bytes_target", fed, r) for r in rows]),
            "transfer_ratio_fedavg_over_mode_system": _ms([ratio("collab_bytes_system", fed, r) for r in rows]),
            "kt_bytes_in_target": _ms([r["target_bytes"]["kt_in"] for r in rows]),
            "collab_bytes_target": _ms([r["collab_bytes_target"] for r in rows]),
            "collab_bytes_system": _ms([r["collab_bytes_system"] for r in rows]),
            "pick_over_batch": _ms([r["pick_over_batch"] for r in rows]),
            "install_over_batch": _ms([r["install_over_batch"] for r in rows]),
            "drift_to_helper_batches": _ms([r["drift_to_helper_batches"] for r in rows]),
            "drift_to_helper_ms": _ms([r["drift_to_helper_ms"] for r in rows]),
        })
    return {"fedavg_mean_error": fedavg_mean, "modes": per_mode}


def headline_table(summary: dict[str, Any], has_fedavg: bool) -> str:
    adapt_key = "adaptability_fedavg" if has_fedavg else "adaptability_pre_drift"
    head = "adaptability (batches to FedAvg's mean error)" if has_fedavg else "adaptability (batches to pre-drift error)"
    lines = [
        f"| mode | excess error after the drift ÷ isolated | {head} | isolated ÷ mode | batches back to its own pre-drift level | post-drift error | collaboration bytes, target | FedAvg ÷ mode bytes (target) | FedAvg ÷ mode bytes (system) | KT bytes in (target) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summary["modes"].items():
        lines.append(
            f"| {mode} | {_fmt(s['excess_over_isolated'])} | {_fmt(s[adapt_key], 1)} | {_fmt(s['ratio_isolated_over_mode'])} "
            f"| {_fmt(s['adaptability_pre_drift'], 1)} | {_fmt(s['post_drift_error'], 3)} "
            f"| {_fmt(s['collab_bytes_target'], 0)} | {_fmt(s['transfer_ratio_fedavg_over_mode_target'], 1)} "
            f"| {_fmt(s['transfer_ratio_fedavg_over_mode_system'], 1)} | {_fmt(s['kt_bytes_in_target'], 0)} |"
        )
    return "\n".join(lines)


def bytes_table(summary: dict[str, Any]) -> str:
    ops = [f"{op}_{d}" for op in OPERATIONS for d in ("out", "in")]
    lines = ["| mode | " + " | ".join(ops) + " |", "|---" * (len(ops) + 1) + "|"]
    for mode, s in summary["modes"].items():
        vals = [np.mean([r["target_bytes"][k] for r in s["runs"]]) for k in ops]
        lines.append(f"| {mode} | " + " | ".join(f"{v:,.0f}" for v in vals) + " |")
    return "\n".join(lines)


def class_error_table(summary: dict[str, Any]) -> str:
    lines = [
        "| mode | pre-drift error | post-drift error | error on the new classes | error on classes the helpers never saw |",
        "|---|---|---|---|---|",
    ]
    for mode, s in summary["modes"].items():
        lines.append(
            f"| {mode} | {_fmt(s['pre_drift_error'], 3)} | {_fmt(s['post_drift_error'], 3)} "
            f"| {_fmt(s['new_class_error'], 3)} | {_fmt(s['unseen_class_error'], 3)} |"
        )
    return "\n".join(lines)


def overhead_table(summary: dict[str, Any]) -> str:
    lines = [
        "| mode | batch time (ms) | picker ÷ batch (helper) | helper creation ÷ batch (target) | drift → helper serving (batches) | drift → helper serving (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, s in summary["modes"].items():
        if not any(r["kt_transfers"] for r in s["runs"]):
            continue
        batch = _ms([r["batch_ms"] for r in s["runs"]])
        lines.append(
            f"| {mode} | {_fmt(batch, 1)} | {_fmt(s['pick_over_batch'])} | {_fmt(s['install_over_batch'], 3)} "
            f"| {_fmt(s['drift_to_helper_batches'], 1)} | {_fmt(s['drift_to_helper_ms'], 1)} |"
        )
    return "\n".join(lines)


def plot_errors(scn: Scenario, runs: Sequence[ModeRun], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = _window(scn)
    for mode in dict.fromkeys(r.mode for r in runs):
        curves = np.array([r.target.served_error for r in runs if r.mode == mode], dtype=float)
        ax.plot(_rolling_mean(np.nanmean(curves, axis=0).tolist(), window), label=mode)
    fl = list(summary["fedavg_mean_error"].values())
    if fl:
        ax.axhline(float(np.mean(fl)), linestyle=":", color="black", label="FedAvg mean error")
    ax.axvline(scn.drift_at, color="grey", linewidth=0.8)
    ax.set_xlabel("request batch")
    ax.set_ylabel(f"target's served error (rolling {window})")
    ax.set_title(scn.title or scn.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(scn: Scenario, runs: Sequence[ModeRun], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(scn, runs)
    has_fedavg = bool(summary["fedavg_mean_error"])
    plot = out / "error-vs-batch.png"
    if runs:
        plot_errors(scn, runs, summary, plot)
    partial = not runs or not all(r.complete for r in runs) or len(runs) < len(scn.modes) * len(scn.seeds)
    md = [
        f"# {scn.title or scn.name}",
        "",
        f"Scenario `{scn.name}`: {_dataset_words(scn)}, "
        f"{scn.model}, {scn.nodes} nodes, batches of {scn.batch_size}, {scn.workload} of classes at batch {scn.drift_at} of {scn.batches}, "
        f"helpers {scn.helpers}, seeds {scn.seeds}, {scn.pacing} pacing; {TRANSPORTS[scn.transport]}.",
        "",
        "**Partial results: the run was interrupted.**" if partial else "",
        f"Excess error after the drift: the served errors above the target's own pre-drift level (mean of the 10 batches before), "
        f"summed over the {scn.post_drift_batches} batches after it, ÷ isolated learning's on the same seed (0: the drift cost nothing; "
        "1: no better than learning alone). Isolated ÷ mode: the paper's adaptability ratio"
        + (" (to FedAvg's mean post-drift error)." if has_fedavg else " (back within the recovery tolerance of the pre-drift error).")
        + (f" New classes per seed: {_new_classes(summary)}." if scn.new_classes is not None else ""),
        "",
        headline_table(summary, has_fedavg),
        "",
        f"![error vs batch]({plot.name})",
        "",
        f"The target's served error over the 10 batches before the drift and the {scn.post_drift_batches} after it, "
        "and after it on the new classes and on those the helpers never saw (mean over seeds):",
        "",
        class_error_table(summary),
        "",
        f"Bytes per operation at the target node (mean over seeds; out / in {BYTES_COUNTED[scn.transport]}):",
        "",
        bytes_table(summary),
        "",
        "Overheads normalised to the time of one request batch (predict + retrain):",
        "",
        overhead_table(summary),
        "",
    ]
    if scn.paper:
        md += ["The paper's figures for this experiment:", ""]
        md += [f"- {k}: {v}" for k, v in scn.paper.items()]
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    payload = {"scenario": scn.model_dump(mode="json"), "summary": summary, "runs": [run_dict(r) for r in runs], "partial": partial}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    return summary


def _dataset_words(scn: Scenario) -> str:
    if scn.dataset == "nslkdd_synthetic":
        return "nslkdd_synthetic (synthetic NSL-KDD schema)"
    if scn.dataset in ("fashion_mnist", "mnist_5k"):
        return f"{scn.dataset} (real images)"
    return f"`{describe(scn.dataset)}`"


def _new_classes(summary: dict[str, Any]) -> str:
    rows = next(iter(summary["modes"].values()), {}).get("runs", [])
    return ", ".join(f"seed {r['seed']}: {r['new_classes']}" for r in rows)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")
