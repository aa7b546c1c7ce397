"""Dataclass configs for every stage, saved with every run.

Each stage reads its own section; a run's manifest keeps the whole RunConfig so a run can be
reproduced from its directory alone. `from_dict` is strict: an unknown key is an error that
names it, so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sae_cxr.attribution import AttributionConfig
from sae_cxr.classifier import ClassifierConfig
from sae_cxr.data.phantom import PhantomConfig
from sae_cxr.evaluate import EvalConfig
from sae_cxr.explain import ExplainStageConfig
from sae_cxr.extract import ExtractConfig
from sae_cxr.gallery import GalleryConfig
from sae_cxr.labeling.stage import LabelConfig
from sae_cxr.patterns import PatternConfig
from sae_cxr.report import ReportStageConfig
from sae_cxr.transcoders.stage import TranscoderStageConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or section that does not match its dataclass."""


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors.

    Keys the dict leaves out keep their values in `base`, or else the parent field's default: a
    [transcoders.train] section with only `lr` keeps the stage's own TrainConfig(epochs=40, ...), not
    TrainConfig()'s."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section {where or cls.__name__}; "
                          f"known keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        inner = getattr(base, name) if base is not None else _field_default(fields[name])
        kwargs[name] = _coerce(hints[name], value, f"{where + '.' if where else ''}{name}", inner)
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {where or cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _coerce(tp: Any, value: Any, where: str, default: Any = None) -> Any:
    """`value` as type `tp`; a nested dataclass section is built over `default` when that is one."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, default if isinstance(default, tp) else None)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, where, default)
        return value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class DataConfig:
    """Where the images come from."""

    source: str = "phantom"
    """phantom | folder | mimic-cxr-jpg | chexpert | nih | rsna."""
    path: str | None = None
    """Root folder (public data sets) or the CSV (folder source); unused for phantom."""
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    """The world to generate when source is phantom."""
    uncertainty: str = "ignore"
    """How uncertain labels (-1) map: ones, zeros or ignore (NaN, left out of losses and metrics)."""
    skip_bad: bool = False
    """Leave out unreadable images (listed and counted) instead of stopping at the first."""
    options: dict[str, Any] = field(default_factory=dict)
    """Source-specific options (e.g. image_root, reports folder, view filter)."""


@dataclass
class RunConfig:
    """A whole pipeline run. Stage sections are added by the stages that use them."""

    name: str = "demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    transcoders: TranscoderStageConfig = field(default_factory=TranscoderStageConfig)
    patterns: PatternConfig = field(default_factory=PatternConfig)
    galleries: GalleryConfig = field(default_factory=GalleryConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    explain: ExplainStageConfig = field(default_factory=ExplainStageConfig)
    report: ReportStageConfig = field(default_factory=ReportStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a run config from JSON or TOML."""
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text()
        if p.suffix.lower() == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{p} is not valid TOML: {e}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return from_dict(cls, data, where=p.name)
