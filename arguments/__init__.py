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
from arguments.help import config_help
from arguments.params import (RETIRED, STOCK_UNUSED, Config, EvalParams, GenerateCamParams, GuidanceParams, ModelParams,
                              NeRFParams, OptimizationParams, PipelineParams, PTDParams)
from utils.files import write_text_atomic

__all__ = ["Config", "ConfigError", "RunError", "EvalParams", "GenerateCamParams", "GuidanceParams", "ModelParams",
           "NeRFParams", "OptimizationParams", "PipelineParams", "PTDParams", "apply_override", "config_from_dict",
           "config_to_dict",
           "load_config", "parse_cli", "save_config", "run_dir"]

# the YAML sections, in file order
GROUPS = ["ModelParams", "PipelineParams", "OptimizationParams", "GuidanceParams", "GenerateCamParams", "PTDParams",
          "EvalParams", "NeRFParams"]


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 scalars where PyYAML's 1.1 rules surprise: booleans only true/false (1.1 reads `mode: off`
    as False), exponent floats without a dot (1e-4), decimal integers whatever their leading zeros (1.1 reads 010 as
    octal 8 and 1:30 as 90), no dates (1.1 reads 2024-01-01 as a date) and no `=` value tag."""


_DROPPED_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp",
                 "tag:yaml.org,2002:value"}
_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED_TAGS]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
# exponent floats without a dot (1e-4): YAML 1.2 floats, strings under PyYAML's 1.1 rules
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                    list("-+.0123456789"))
# YAML 1.2 integers (decimal, 0x hex, 0o octal), plus 1.1's digit separators (stock configs write 100_000)
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int",
                                    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
                                    list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    for prefix, base in (("0x", 16), ("0o", 8)):
        if text.startswith(prefix):
            return int(text[2:], base)
    return int(text, 10)  # 010 is ten, as YAML 1.2 reads it


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Yaml12Dumper(yaml.SafeDumper):
    """Quotes every string that either rule set (ours or PyYAML's 1.1) would read as something else, so that a saved
    config loads back equal under both (e.g. a workspace named 1e5, 0o17 or 010)."""


_Yaml12Dumper.yaml_implicit_resolvers = {
    ch: [*yaml.SafeDumper.yaml_implicit_resolvers.get(ch, []), *_Yaml12Loader.yaml_implicit_resolvers.get(ch, [])]
    for ch in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(_Yaml12Loader.yaml_implicit_resolvers)}

# the values that set an Optional[str] key (a path) to None in an override; YAML's null spellings
NULLS = ("null", "Null", "NULL", "~")
# how a binary file passed to --opt starts, for the error line
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF (WebP/WAV) file"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip file"),
          (b"%PDF", "a PDF"), (b"\x7fELF", "an executable"))


def yaml_load(text: str):
    """Parse YAML text with the YAML 1.2 scalars of _Yaml12Loader."""
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
        if isinstance(value, (bool, int, float)):  # a file's `workspace: 007` or `text: true`: YAML read a scalar
            read = "a boolean" if isinstance(value, bool) else "an integer" if isinstance(value, int) else "a number"
            raise ConfigError(f"{where}: expected a string, got {value!r} (YAML read {read}); put the value in quotes "
                              f"to keep it as written, e.g. '007'")
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


def _is_str(tp: Any) -> bool:
    """str or Optional[str]."""
    return tp is str or (typing.get_origin(tp) is typing.Union and
                         [a for a in typing.get_args(tp) if a is not type(None)] == [str])


def _override_value(raw: str, tp: Any) -> Any:
    """The value of an override for a key of type `tp`. A string key (a prompt, a path, a name) takes the text as
    written: YAML would cut `a cat #1` at the comment, read `a cat: studio` as a mapping, `007` as 7 and 2024-01-01
    as a date. An Optional[str] key is None for `null` (or `~`). Any other type is read as YAML (`[0.1, 0.2]`, `1e-4`,
    `true`); text that is not valid YAML stays a string, for the type check to name."""
    if _is_str(tp):
        return None if tp is not str and raw in NULLS else raw
    if raw == "":
        return ""
    try:
        return yaml_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(cfg: Config, override: str) -> None:
    """Apply one `Section.key=value` (or `key=value` for top-level keys): string keys take the value as written, the
    others parse it as YAML (`_override_value`)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected Section.key=value, e.g. GuidanceParams.guidance_scale=5")
    dotted, raw = override.split("=", 1)
    parts = dotted.split(".")
    source = f"override '{override}'"
    if len(parts) == 1:
        obj, group, key = cfg, "", parts[0]
    elif len(parts) == 2:
        if parts[0] not in GROUPS:
            raise ConfigError(f"{source}: unknown section '{parts[0]}'{_closest(parts[0], GROUPS)}")
        obj, group, key = getattr(cfg, parts[0]), parts[0], parts[1]
    else:
        raise ConfigError(f"{source}: expected Section.key=value")
    tp = None if group == "" and key in GROUPS else typing.get_type_hints(type(obj)).get(key)
    _set_field(obj, group, key, _override_value(raw, tp), source)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file strictly, then apply the dotted overrides in order."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        cfg = config_from_dict(read_config_file(path), source=str(path), base=cfg)
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def read_config_file(path: Path) -> dict:
    """The mapping of a YAML config file; a one-line ConfigError for a folder, a binary file, invalid YAML, an empty
    file or a key given twice."""
    if path.is_dir():
        saved = path / "config.yaml"
        hint = f", e.g. {saved} (the run's saved config)" if saved.is_file() else ""
        raise ConfigError(f"config file '{path}' is a folder; pass a YAML file with --opt{hint}")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML with --opt")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read ({err.strerror or err}); pass a readable YAML with "
                          f"--opt") from None
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
    except UnicodeDecodeError:
        kind = next((name for magic, name in _MAGIC if raw.startswith(magic)), "a binary file (not UTF-8 text)")
        raise ConfigError(f"config file '{path}' is {kind}, not a YAML config; pass a .yaml file with --opt, e.g. "
                          f"configs/smoke.yaml") from None
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    finally:
        loader.dispose()
    # Refused, not warned: an empty file is almost always a mistake (the wrong file, a truncated copy, an editor that
    # did not save), and a run on all defaults costs hours before anyone reads a warning; the defaults stay one step
    # away (leave out --opt).
    if data is None:
        raise ConfigError(f"config file '{path}' is empty (no sections); pass a config such as configs/smoke.yaml, "
                          f"or leave out --opt to run on the defaults")
    return data


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "", seen_nodes: set | None = None) -> None:
    """PyYAML lets the last of two equal keys win silently; a config file that sets a section or key twice is
    refused with both line numbers."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already walked (anchors can even make cycles)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix, seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_node.value in lines:
                section = not prefix and key_node.value in GROUPS
                what, fix = ("section", "merge them") if section else ("key", "keep one")
                first = lines[key_node.value]
                raise ConfigError(f"config file '{path}': {what} '{name}' is given twice (lines {first} and {line}); "
                                  f"{fix}")
            lines[key_node.value] = line
            _refuse_duplicate_keys(value_node, path, f"{name}.", seen_nodes)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike, comment: str = "") -> None:
    """Write the resolved config as YAML, atomically (loads back with --opt); `comment` (e.g. what ran: rasteriser,
    model, precision) goes on top as YAML comment lines, which loading ignores."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    write_text_atomic(path, header + yaml.dump(config_to_dict(cfg), Dumper=_Yaml12Dumper, sort_keys=False))


def run_dir(cfg: Config) -> Path:
    """The run folder <output_root>/<workspace>."""
    return Path(cfg.ModelParams.output_root) / cfg.ModelParams.workspace


def parse_cli(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> tuple[Config, argparse.Namespace]:
    """Parse `--opt FILE [Section.key=value ...]` plus the script's own flags; exit 2 with one line on a bad config.

    The overrides may come before, between or after the flags (`train.py --opt c.yaml --resume X.y=1`). A flag that
    takes several values (batch.py's `--arm NAME Section.key=value ...`) still takes every word up to the next flag:
    an override meant for the whole run goes before it, or after a later flag."""
    parser.add_argument("--opt", type=str, default=None, help="YAML config (LucidDreamer layout)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. GuidanceParams.guidance_scale=5")
    # every config key with its default and doc line, after the flags (kept as laid out: raw epilog)
    parser.epilog = "\n\n".join(filter(None, [parser.epilog, config_help()]))
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    try:
        args = parser.parse_intermixed_args(argv)
    except TypeError:  # a parser argparse cannot intermix (REMAINDER, a positional in an exclusive group)
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
