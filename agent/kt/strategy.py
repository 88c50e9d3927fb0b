"""The one way a pluggable knob is picked: a typed pydantic config whose ``build()`` makes it.

Strategies with settings (the drift detector, the ensemble operator, the discard policy) are a
union of configs told apart by ``type``. Strategies without settings (how received knowledge is
used, where sensitivity comes from, how positions are chosen, which helper is asked) derive from
`NamedStrategyConfig`: the same ``type`` field, but written as the bare name in a settings file, a
config patch or a dump (``kt_apply = "boost"`` and ``kt_apply = {type = "boost"}`` are one value).

>>> from typing import Literal
>>> class Colour(NamedStrategyConfig):
...     type: Literal["red", "blue"] = "red"
>>> Colour.model_validate("blue"), Colour.model_validate({"type": "blue"}).model_dump()
(Colour(type='blue'), 'blue')
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator


class NamedStrategyConfig(BaseModel):
    """Base of the config of a strategy that has a name and no settings (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_serializer
    def _as_name(self) -> str:
        return self.type

    def __eq__(self, other: object) -> bool:
        # A bare name compares equal too, so `config.kt_apply == "off"` reads as it is written.
        if isinstance(other, str):
            return self.type == other
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash((type(self), self.type))
