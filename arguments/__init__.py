"""Strict YAML configs: `--opt file.yaml` plus dotted overrides (`GuidanceParams.guidance_scale=5`).

Unknown keys and wrong types are rejected with a one-line `ConfigError` that names the file or argument, the key and
the closest valid key. Stock LucidDreamer keys we do not use load with a one-line warning.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from arguments.errors import ConfigError, RunError
from arguments.params import (RETIRED, STOCK_UNUSED, Config, EvalParams, GenerateCamParams, GuidanceParams, ModelParams,
                              OptimizationParams, PipelineParams, PTDParams)
from utils.files import write_text_atomic

__all__ = ["Config", "ConfigError", "RunError", "EvalParams", "GenerateCamParams", "GuidanceParams", "ModelParams",
           "OptimizationParams", "PipelineParams", "PTDParams", "apply_override", "config_from_dict", "config_to_dict",
           "load_config", "parse_cli", "save_config", "run_dir"]

# the YAML sections, in file order
GROUPS = ["ModelParams", "PipelineParams", "OptimizationParams", "GuidanceParams", "GenerateCamParams", "PTDParams",
          "EvalParams"]


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false. PyYAML's 1.1 rules would read `mode: off` as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
# exponent floats without a dot (1e-4): YAML 1.2 floats, strings under PyYAML's 1.1 rules
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                    list("-+.0123456789"))


def yaml_load(text: str):
    """Parse YAML text with YAML 1.2 booleans and exponent floats."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _closest(key: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_type(value, args[0], where)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan / .inf would run and silently poison every step
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover - a dataclass bug


def _set_field(obj: Any, group: str, key: str, value: Any, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = [name for name in hints if name not in GROUPS] if group else list(hints)
    dotted = f"{group}.{key}" if group else key
    if key not in hints or (group == "" and key in GROUPS):
        if key in STOCK_UNUSED.get(group, set()):
            warnings.warn(f"{source}: ignoring stock LucidDreamer key '{dotted}' (not used by this project)",
                          stacklevel=3)
            return
        if key in RETIRED.get(group, {}):
            warnings.warn(f"{source}: ignoring retired key '{dotted}' ({RETIRED[group][key]})", stacklevel=3)
            return
        raise ConfigError(f"{source}: unknown key '{dotted}'{_closest(key, fields)}")
    setattr(obj, key, _check_type(value, hints[key], f"{source}: '{dotted}'"))


def config_from_dict(data: dict, source: str = "config", base: Config | None = None) -> Config:
    """Build a Config from a nested dict (YAML layout), starting from `base` (default: all defaults)."""
    cfg = base if base is not None else Config()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for key, value in data.items():
        if key in GROUPS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section '{key}' must be a mapping")
            group = getattr(cfg, key)
            for sub, subval in value.items():
                _set_field(group, key, str(sub), subval, source)
        else:
            _set_field(cfg, "", str(key), value, source)
    return cfg


def apply_override(cfg: Config, override: str) -> None:
    """Apply one `Section.key=value` (or `key=value` for top-level keys); value parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected Section.key=value, e.g. GuidanceParams.guidance_scale=5")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = dotted.split(".")
    source = f"override '{override}'"
    if len(parts) == 1:
        _set_field(cfg, "", parts[0], value, source)
    elif len(parts) == 2:
        if parts[0] not in GROUPS:
            raise ConfigError(f"{source}: unknown section '{parts[0]}'{_closest(parts[0], GROUPS)}")
        _set_field(getattr(cfg, parts[0]), parts[0], parts[1], value, source)
    else:
        raise ConfigError(f"{source}: expected Section.key=value")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file strictly, then apply the dotted overrides in order."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML with --opt")
        try:
            data = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
        cfg = config_from_dict(data, source=str(path), base=cfg)
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (loads back with --opt)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def run_dir(cfg: Config) -> Path:
    """The run folder <output_root>/<workspace>."""
    return Path(cfg.ModelParams.output_root) / cfg.ModelParams.workspace


def parse_cli(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> tuple[Config, argparse.Namespace]:
    """Parse `--opt FILE [Section.key=value ...]` plus the script's own flags; exit 2 with one line on a bad config."""
    parser.add_argument("--opt", type=str, default=None, help="YAML config (LucidDreamer layout)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. GuidanceParams.guidance_scale=5")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _one_line_warning
            cfg = load_config(args.opt, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return cfg, args


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
