"""Load a run config: YAML files (with `defaults:` includes) + `key=value` overrides.

    cfg = load_config("configs/lm/tiny.yaml", ["parallel.cp=2", "train.steps=50"])

A YAML file may start with `defaults: [other.yaml, ...]` (paths relative to it), merged
first in order, hydra-style. The merged result is checked against the dataclasses of
`schema.py` (unknown keys and wrong types fail there) and then validated once
(`validation.py`); every error names the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import MODEL_CONFIGS, Config, LMConfig
from .validation import ConfigError, resolve_lm, validate


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in seen:
        raise ConfigError(f"config includes itself: {' -> '.join(map(str, (*seen, path)))}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of sections, not a list")
    includes = node.pop("defaults", [])
    if isinstance(includes, str):
        includes = [includes]
    merged = OmegaConf.create()
    for inc in includes:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(inc), (*seen, path)))
    return OmegaConf.merge(merged, node)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              "(e.g. train.steps=100, parallel.cp=2)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from None


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    return f"config key {key!r}: {msg}"


def build_config(raw: DictConfig) -> Config:
    """Type-check a merged raw config against the schema and validate it."""
    kind = OmegaConf.select(raw, "model.kind", default="lm")
    if kind not in MODEL_CONFIGS:
        raise ConfigError(f"model.kind={kind!r} is not one of {', '.join(sorted(MODEL_CONFIGS))}")
    schema = OmegaConf.structured(Config)
    schema.model = OmegaConf.structured(MODEL_CONFIGS[kind])
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    validate(cfg)
    if isinstance(cfg.model, LMConfig):
        cfg = replace(cfg, model=resolve_lm(cfg.model))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The validated config of `path` (optional) with `overrides` applied."""
    raw = _read_yaml(Path(path)) if path is not None else OmegaConf.create()
    raw = OmegaConf.merge(raw, _parse_overrides(list(overrides or [])))
    return build_config(raw)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory's `config.yaml` holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(cfg))
