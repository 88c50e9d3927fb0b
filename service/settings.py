"""The settings of every daemon: a TOML file (``--config``), then ``CLUE_<DAEMON>_*`` environment
variables, then flags. A later source wins; an unknown key or a bad value is an error naming the field.

A daemon's settings are one pydantic-settings model deriving from `DaemonSettings`, and from
`BrokerSettings` when it talks MQTT. Its flags are made from its fields (`max_k` -> ``--max-k``),
each help line naming the default and the variable. `DaemonSettings.from_argv` raises
`ConfigError`, which `service.runner.serve` turns into exit 78 (`service.exit_codes`).

Secrets are never values: settings name files, and a relative name is looked up in systemd's
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) first.

>>> class DemoSettings(DaemonSettings):
...     model_config = SettingsConfigDict(env_prefix="CLUE_DEMO_")
...     program: ClassVar[str] = "clue-demo"
...     size: int = Field(3, ge=1, description="how many")
>>> DemoSettings.from_argv(["--size", "5"]).size
5
>>> try:
...     DemoSettings.from_argv(["--size", "0"])
... except ConfigError as exc:
...     print(exc)
invalid settings: size: Input should be greater than or equal to 1
"""

from __future__ import annotations

import contextvars
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from service.cli import ServiceArgumentParser

_S = TypeVar("_S", bound="LayeredSettings")
_D = TypeVar("_D", bound="DaemonSettings")
_TOML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("clue_settings_toml", default=None)


class ConfigError(ValueError):
    """A setting is invalid, or a file it names cannot be used; the daemon exits 78."""


def problems(exc: ValidationError) -> str:
    """Every error of `exc` on one line, each after the field it is about: ``max_k: Input should…``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())


def credential_path(name: str | Path) -> Path:
    """Where a secret lives: an absolute path as it is; a relative one under ``$CREDENTIALS_DIRECTORY``
    when it is there, else from the working directory. ConfigError when no file is there."""
    path = Path(name)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds and (Path(creds) / path).exists():
        path = Path(creds) / path
    if not path.is_file():
        raise ConfigError(f"credential file {path} does not exist")
    return path


def _holds_model(annotation: Any) -> bool:
    """A model, or a union with one (``FlConfig | None``): a table in the file, no flag."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return any(isinstance(kind, type) and issubclass(kind, BaseModel) for kind in kinds)


def _default_text(value: Any) -> str:
    return "" if value is None else f"default {value!r}; "


class LayeredSettings(BaseSettings):
    """Strict settings read from a TOML file, then the environment, then keyword arguments (flags).

    What every daemon's settings share, the agent's included (whose flags and nested tables are
    its own); a subclass sets ``env_prefix`` in its `model_config`.
    """

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    _config_file: Path | None = PrivateAttr(None)

    @property
    def config_file(self) -> Path | None:
        """The TOML file these settings were loaded from (a reload reads it again), or None."""
        return self._config_file

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (the keyword arguments), then the environment, then the file: the first one wins.
        toml_file = _TOML_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def load(cls: type[_S], config_file: str | Path | None = None, **flags: Any) -> _S:
        """Settings from `config_file` (TOML), then the environment, then `flags` (None: not given).

        Raises ConfigError naming every problem.
        """
        path = Path(config_file) if config_file is not None else None
        if path is not None and not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        token = _TOML_FILE.set(path)
        try:
            settings = cls(**{k: v for k, v in flags.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {problems(exc)}") from exc
        except (OSError, ValueError) as exc:  # an unreadable or malformed file, a variable that is not JSON
            raise ConfigError(f"cannot read settings: {exc}") from exc
        finally:
            _TOML_FILE.reset(token)
        settings._config_file = path
        return settings


class DaemonSettings(LayeredSettings):
    """The base of every daemon's settings (module docstring).

    A subclass sets `program` (its command, ``clue-mds``), `description` (its ``--help`` line) and
    ``env_prefix`` in its `model_config`. Fields that are models themselves get no flag.
    """

    program: ClassVar[str] = "clue"
    description: ClassVar[str] = ""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    stats_interval: float = Field(60.0, ge=0.0, description="s between stats lines in the log (0: only at exit)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def parser(cls) -> ServiceArgumentParser:
        """``--config`` and one flag per field; a usage error exits 78 (`service.cli`)."""
        prefix = cls.model_config.get("env_prefix", "").upper()
        p = ServiceArgumentParser(prog=cls.program, description=cls.description)
        p.add_argument("--config", metavar="FILE", help=f"TOML settings file (then ${prefix}* variables, then these flags)")
        for name, field in cls.model_fields.items():
            if _holds_model(field.annotation):
                continue
            default = "required; " if field.is_required() else _default_text(field.get_default(call_default_factory=True))
            text = f"{field.description} [{default}${prefix}{name.upper()}]".replace("%", "%%")
            flag = "--" + name.replace("_", "-")
            # Values go to the model as text: it converts and checks them as it does a variable's.
            if field.annotation is bool:
                p.add_argument(flag, action="store_const", const=True, help=text)
            else:
                p.add_argument(flag, metavar=name.upper(), help=text)
        return p

    @classmethod
    def from_argv(cls: type[_D], argv: Sequence[str] | None = None) -> _D:
        """Parse the command line (``sys.argv`` when None) and load; raises ConfigError."""
        flags = vars(cls.parser().parse_args(argv))
        return cls.load(flags.pop("config"), **flags)


class BrokerSettings(BaseModel):
    """How a daemon reaches the broker: the same fields, at the top level, in every daemon's settings.

    Each file must exist when the settings are loaded; `client_kwargs()` hands them to the client.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str = Field(
        "mqtt://127.0.0.1:1883", description="mqtt://host:port, mqtts://host:port, unix:///path or a socket path"
    )
    username: str | None = Field(None, description="MQTT username (not needed with TLS client certificates)")
    password_file: str | None = Field(None, description="file holding the MQTT password (credential name or path)")
    tls_ca: str | None = Field(None, description="CA certificate file (credential name or path)")
    tls_cert: str | None = Field(None, description="client certificate file (credential name or path)")
    tls_key: str | None = Field(None, description="client key file (credential name or path)")
    tls_key_password_file: str | None = Field(
        None, description="file holding the client key's password (credential name or path)"
    )

    @field_validator("broker")
    @classmethod
    def _socket_path(cls, value: str) -> str:
        return f"unix://{value}" if value.startswith("/") else value

    @field_validator("password_file", "tls_ca", "tls_cert", "tls_key", "tls_key_password_file")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        # Kept as given (a credential name stays a name); checked now, so a typo exits 78 at once.
        if value is not None:
            credential_path(value)
        return value

    def client_kwargs(self) -> dict[str, Any]:
        """The `MqttClient` keyword arguments of these settings but the URL (`from_url(self.broker, …)`)."""
        files = {
            name: None if getattr(self, name) is None else credential_path(getattr(self, name))
            for name in ("password_file", "tls_ca", "tls_cert", "tls_key", "tls_key_password_file")
        }
        return {"username": self.username, **files}


__all__ = ["BrokerSettings", "ConfigError", "DaemonSettings", "LayeredSettings", "credential_path", "problems"]
