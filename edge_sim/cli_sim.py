"""``clue-sim``: run fleet scenarios, over MQTT or in process, and write their reports.

    clue-sim run default                 # README command 1: the default scenario
    clue-sim run my.toml --broker mqtt://host:1883 --out runs/mine
    clue-sim run fig2_overlapping --transport inprocess --seeds 0 1 2 3 4   # the learners in this process
    clue-sim run default --set value_codec=int4_delta --set drift.window=5     # other learner knobs
    clue-sim list                        # the shipped scenarios
    clue-sim all --out runs/all [--resume]   # every shipped scenario into one report (long)
    clue-sim base --scenario default --out base.safetensors  # a fleet's shared base model (or .npz)
    clue-sim feed --broker URL --scenario default --nodes a,b,c,d,e --out DIR   # agents run elsewhere
    clue-sim feed --broker mqtts://broker.lan:8883 --tls-ca ca.crt --tls-cert feeder.crt --tls-key feeder.key \
        --collector-tls-cert collector.crt --collector-tls-key collector.key --nodes a,b,c --out DIR

``feed`` plays the workload to as many nodes as ``--nodes`` names (the scenario's ``nodes`` is
replaced by that count); the fleet's base model comes from ``clue-sim base`` of the same scenario.
Under the fleet ACL feeding and reading are two identities, ``feeder`` and ``collector``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agent.config import LearnerConfig
from agent.errors import ConfigError
from agent.models import save_weights
from agent.settings import nest_dotted
from broker.ctl import UsageError, parse_assignment
from edge_sim.inputs import prepare_seed, scenario_data
from edge_sim.report import headline_table, write_report
from edge_sim.runner import run_scenario
from edge_sim.scenario import Scenario, load_scenario, shipped_scenarios
from edge_sim.transports.mqtt import feed_external
from edge_sim.why import diagnose_scenario, diagnosis_table
from service.exit_codes import EXIT_CONFIG


def _run(scn: Scenario, out: Path, broker: str | None, workdir: Path | None, console: Console) -> dict:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(f"{scn.name}: {label}", total=total)
            bar.update(tasks[label], completed=done)

        started = time.perf_counter()
        runs = run_scenario(scn, broker_url=broker, workdir=workdir, progress=progress)
    summary = write_report(scn, runs, out)
    print(headline_table(summary, bool(summary["fedavg_mean_error"])))
    console.print(f"\n{scn.name}: {time.perf_counter() - started:.0f} s; wrote {out / 'report.md'}, {out / 'results.json'}")
    return summary


def _finished(out: Path, scn: Scenario) -> dict | None:
    """The summary of an earlier complete run of exactly this scenario in ``out``, else None."""
    try:
        saved = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("partial", True) or saved.get("scenario") != json.loads(scn.model_dump_json()):
        return None
    return saved["summary"]


def _with_nodes(scn: Scenario, count: int) -> Scenario:
    """``scn`` for ``count`` nodes. The base model and node i's workload do not depend on the count
    (a wrong helper is the last node, whatever the count); FedAvg, which a feed does not run, is
    capped so that the scenario stays valid."""
    try:
        return Scenario.model_validate({
            **scn.model_dump(), "nodes": count,
            "fedavg": {**scn.fedavg.model_dump(), "per_round": min(scn.fedavg.per_round, count)},
        })
    except ValueError as exc:
        raise ConfigError(f"--nodes: {exc}") from exc


def _overridden(scn: Scenario, overrides: dict) -> Scenario:
    try:
        return Scenario.model_validate({**scn.model_dump(), **overrides})
    except ValueError as exc:
        raise ConfigError(f"{scn.name}: {exc}") from exc


def _learner_with(learner: dict, assignments: list[str]) -> dict:
    """The scenario's ``[learner]`` table with ``KEY=VALUE`` assignments laid over it (a table merges)."""
    try:
        values = nest_dotted(dict(parse_assignment(a) for a in assignments))
    except UsageError as exc:
        raise ConfigError(f"--set: {exc}") from exc
    current = LearnerConfig.model_validate(learner).model_dump()
    merged = dict(learner)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            # A table's settings belong to its type: a new type starts from its own defaults.
            table = merged.get(key) if isinstance(merged.get(key), dict) else {"type": current[key]["type"]}
            if value.get("type", table.get("type")) != table.get("type"):
                table = {}
            value = {**table, **value}
        merged[key] = value
    return merged


def _feed_tls(args: argparse.Namespace) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """``MqttClient`` TLS settings of the feeding client and of the reading one (None: none)."""
    for option in ("tls_ca", "tls_cert", "tls_key", "collector_tls_cert", "collector_tls_key"):
        path = getattr(args, option)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"--{option.replace('_', '-')} {path}: not a readable file")
    if (args.collector_tls_cert is None) != (args.collector_tls_key is None):
        raise ConfigError("--collector-tls-cert and --collector-tls-key go together")

    def identity(cert: str | None, key: str | None) -> dict[str, str] | None:
        given = {"tls_ca": args.tls_ca, "tls_cert": cert, "tls_key": key}
        return {k: v for k, v in given.items() if v is not None} or None

    reader = identity(args.collector_tls_cert, args.collector_tls_key) if args.collector_tls_cert else None
    return identity(args.tls_cert, args.tls_key), reader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clue-sim", description="CLUE Edge fleet simulator (real daemons over MQTT, or the learners in process).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one scenario (a TOML file or a shipped name)")
    run.add_argument("scenario")
    run.add_argument("--transport", choices=["mqtt", "inprocess"], help="override the scenario's transport")
    run.add_argument("--broker", help="use this broker (mqtt://host:port); default: a private mosquitto")
    run.add_argument("--out", type=Path, help="report folder (default runs/<scenario>)")
    run.add_argument("--workdir", type=Path, help="keep logs, state and the MdS database here")
    run.add_argument("--seeds", type=int, nargs="+", help="override the scenario's seeds")
    run.add_argument("--modes", help="override the scenario's modes (comma-separated)")
    run.add_argument("--pacing", choices=["lockstep", "free"], help="override the scenario's pacing")
    run.add_argument("--backbone-runtime", choices=["torch", "onnxruntime", "litert"], help="override the scenario's backbone engine (split serving)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a learner knob for every mode, laid over the scenario's [learner] table (a mode's own knobs still win); "
        "repeatable: --set value_codec=int4_delta --set drift.window=5",
    )
    sub.add_parser("list", help="list the shipped scenarios")
    why = sub.add_parser("why", help="at the target's drift: what each helper knows of the new classes, and what its boosted helper scores")
    why.add_argument("scenario")
    why.add_argument("--seeds", type=int, nargs="+", help="override the scenario's seeds")
    why.add_argument("--eval-batches", type=int, default=10, help="target request batches after the drift to score on (default 10)")
    why.add_argument("--json", type=Path, help="also write the measurements here")
    every = sub.add_parser("all", help="run every shipped scenario into one report (takes long)")
    every.add_argument("--out", type=Path, default=Path("runs/all"))
    every.add_argument("--broker")
    every.add_argument("--resume", action="store_true", help="keep the scenarios whose complete results are already in --out")
    base = sub.add_parser("base", help="pre-train a scenario's shared base model (first seed) and save it as .safetensors or .npz (by --out's suffix)")
    base.add_argument("--scenario", default="default")
    base.add_argument("--out", type=Path, required=True)
    feed = sub.add_parser("feed", help="play a scenario's workload to agents run elsewhere (e.g. docker compose)")
    feed.add_argument("--scenario", default="default", help="a TOML file or a shipped name (default: default)")
    feed.add_argument("--broker", required=True, help="mqtt://host:port, mqtts://host:port or unix:///path")
    feed.add_argument("--nodes", required=True, help="comma-separated node ids, 2 to 64 (the scenario's node count is replaced); the first is the target")
    feed.add_argument("--out", type=Path, required=True, help="report folder")
    feed.add_argument("--tls-ca", help="CA certificate file (turns TLS on)")
    feed.add_argument("--tls-cert", help="client certificate file (CN feeder under the fleet ACL)")
    feed.add_argument("--tls-key", help="client key file")
    feed.add_argument("--collector-tls-cert", help="certificate of a second client that reads predictions, events and status (CN collector)")
    feed.add_argument("--collector-tls-key", help="its key file")
    args = parser.parse_args(argv)
    console = Console(stderr=False)

    if args.command == "list":
        for path in shipped_scenarios():
            scn = load_scenario(path)
            console.print(f"{scn.name:24s} {scn.title}")
        return 0
    try:
        if args.command == "base":
            scn = load_scenario(args.scenario)
            inputs = prepare_seed(scn, scn.seeds[0], scenario_data(scn))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_weights(args.out, inputs.base)
            console.print(f"wrote {args.out} (scenario {scn.name}, seed {scn.seeds[0]})")
            return 0
        if args.command == "why":
            scn = load_scenario(args.scenario)
            if args.seeds:
                scn = _overridden(scn, {"seeds": args.seeds})
            diagnoses = diagnose_scenario(scn, eval_batches=args.eval_batches)
            print(diagnosis_table(diagnoses))
            if args.json:
                args.json.write_text(json.dumps([d.as_dict() for d in diagnoses], indent=1))
            return 0
        if args.command == "feed":
            nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
            scn = _with_nodes(load_scenario(args.scenario), len(nodes))
            tls, collector_tls = _feed_tls(args)
            run = feed_external(scn, args.broker, nodes, tls=tls, collector_tls=collector_tls)
            summary = write_report(scn, [run], args.out)
            print(headline_table(summary, False))
            return 0
        if args.command == "run":
            scn = load_scenario(args.scenario)
            overrides = {}
            if args.seeds:
                overrides["seeds"] = args.seeds
            if args.modes:
                overrides["modes"] = [m.strip() for m in args.modes.split(",") if m.strip()]
            if args.pacing:
                overrides["pacing"] = args.pacing
            if args.transport:
                overrides["transport"] = args.transport
            if args.backbone_runtime:
                overrides["backbone_runtime"] = args.backbone_runtime
            if args.set:
                overrides["learner"] = _learner_with(scn.learner, args.set)
            if overrides:
                scn = _overridden(scn, overrides)
            _run(scn, args.out or Path("runs") / scn.name, args.broker, args.workdir, console)
            return 0
        index = ["# CLUE Edge — every shipped scenario", ""]
        args.out.mkdir(parents=True, exist_ok=True)
        for path in shipped_scenarios():
            scn = load_scenario(path)
            summary = _finished(args.out / scn.name, scn) if args.resume else None
            if summary is None:
                summary = _run(scn, args.out / scn.name, args.broker, None, console)
            else:
                console.print(f"{scn.name}: kept the complete results in {args.out / scn.name}")
            index += [f"## {scn.title or scn.name}", "", f"[report]({scn.name}/report.md)", "",
                      headline_table(summary, bool(summary["fedavg_mean_error"])), ""]
            index += [f"- paper, {k}: {v}" for k, v in scn.paper.items()] + [""]
            # Written after every scenario: an interrupted run still leaves an index of what finished.
            (args.out / "report.md").write_text("\n".join(index))
        return 0
    except ConfigError as exc:
        print(f"clue-sim: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
