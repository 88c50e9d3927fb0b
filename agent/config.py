"""The learner's knobs (ARCHITECTURE §6): one strict pydantic model, every field with a default.

The daemon's own settings (broker, node id, paths) wrap this model; a ConfigPatch from an operator
is validated against it as a whole before anything changes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.drift import DriftConfig, NoveltyOrErrorConfig
from agent.ensemble import OperatorConfig, TrustOperatorConfig
from agent.errors import ConfigError
from agent.kt.booster import KtApplyConfig
from agent.kt.coordinator import HelpPolicy
from agent.kt.helper_selection import HelperSelectionConfig
from agent.kt.picker import PickerConfig, SelectionConfig
from agent.kt.pool import DiscardConfig, DynamicDiscardConfig
from service.settings import problems


class LearnerConfig(BaseModel):
    """What the per-batch pipeline and knowledge transfer do; all changeable at run time."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    z: float = Field(0.5, ge=0.01, le=1.0, description="fraction of each parameter tensor a helper sends")
    serve_max_z: float = Field(
        0.5, ge=0.01, le=1.0,
        description="largest fraction of a tensor this node sends as a helper; a KT request asking for more is refused",
    )
    input_range: tuple[float, float] = Field(
        (-16.0, 16.0),
        description="[low, high] every input value must lie in; a batch with a value outside is refused (raw 0-255 pixels, overflowed or garbage inputs), normalised inputs fit the default",
    )
    reservoir_batches: int = Field(1, ge=1, le=64, description="B: request batches a helper keeps for on-demand sensitivity")
    picker_samples: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="rows of the reservoir the on-demand picker computes sensitivity over, drawn at random; 0: every row (cheaper with fewer, at some cost in adaptability)",
    )
    picker: PickerConfig = Field(
        default_factory=PickerConfig, description="sensitivity from the reservoir (on_demand), or a running per-class map (continuous)"
    )
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig,
        description="how a helper picks parameters; 'random' is the control (same Z, random positions)",
    )
    drift: DriftConfig = Field(default_factory=NoveltyOrErrorConfig, description="drift detector and its settings")
    operator: OperatorConfig = Field(
        default_factory=TrustOperatorConfig,
        description="ensemble operator: per-class trust weights learned from every labelled batch (trust), the class-aware prior alone (class_aware), or the paper's mean",
    )
    kt_apply: KtApplyConfig = Field(
        default_factory=KtApplyConfig,
        description="use of received parameters: a boosted model that keeps learning and is promoted into the target once better (branch), a frozen boosted helper model (the paper's CLUE), zero-filled helper, write into the target, average into it, or no KT (isolated)",
    )
    discard: DiscardConfig = Field(default_factory=DynamicDiscardConfig, description="when helpers leave the pool")
    pool_max: int = Field(4, ge=1, le=64, description="most helpers pooled at once")
    k: int = Field(3, ge=1, le=32, description="helper candidates asked of the MdS")
    helper_selection: HelperSelectionConfig = Field(
        default_factory=HelperSelectionConfig,
        description="which candidate is asked: the one holding most of the missing classes, most similar first; or, for the first request only, the least similar node (the paper's wrong-helper staging, Fig. 10)",
    )
    split_helpers: int = Field(
        4, ge=1, le=64, description="most helpers one request is split across when no single candidate holds every missing class (pooling, Fig. 8)"
    )
    drop_unhelpful: bool = Field(
        True,
        description="drop a helper that was no better than the target on its own classes over its first L batches, and ask another node",
    )
    helper_probe: bool = Field(
        True,
        description="a new helper must be no worse than chance on its classes in the last labelled batch before it serves (its outputs must be finite either way); off only for the random-mask control",
    )
    value_codec: Literal["float32", "float16", "int8", "int4_delta"] = Field("int4_delta", description="how transferred weights are encoded")
    value_delta: bool = Field(False, description="send weights as deltas from the shared base weights (quantise better)")
    lr: float = Field(1e-3, ge=1e-6, le=0.05, description="online Adam learning rate, one step per labelled batch (above 0.05 Adam destroys a trained model within a few batches)")
    help_delay: int = Field(0, ge=0, le=100_000, description="batches between drift detection and the help request (the paper's 'delayed by X')")
    help_cooldown: int = Field(10, ge=0, le=100_000, description="batches before the same classes may be asked for again")
    history_window: int = Field(3, ge=1, le=1000, description="recent batches whose class histogram, against the long run, names the classes to ask for")

    @field_validator("input_range")
    @classmethod
    def _ordered_finite(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"input_range must be two finite numbers, low < high; got {list(value)}")
        return value


def patched(config: LearnerConfig, values: dict[str, Any]) -> LearnerConfig:
    """A new config with ``values`` applied (nested models replaced whole), validated as a whole.

    Raises ConfigError naming every invalid field; ``config`` itself never changes.
    """
    merged = config.model_dump()
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            nested = dict(merged[key])
            if "type" in value and value["type"] != nested.get("type"):
                nested = {}
            nested.update(value)
            merged[key] = nested
        else:
            merged[key] = value
    try:
        return LearnerConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid config patch: {problems(exc)}") from exc


def help_policy(config: LearnerConfig, *, relay: str | None = None) -> HelpPolicy:
    """The help coordinator's knobs from a learner config (`relay`: the daemon's relay mode)."""
    return HelpPolicy(
        enabled=config.kt_apply.build().enabled, cooldown=config.help_cooldown, delay=config.help_delay,
        split_helpers=config.split_helpers, selection=config.helper_selection, k=config.k, z=config.z,
        value_codec=config.value_codec, relay=relay,
    )
