"""The config part of every entry script's `--help`: each key, by section, with its default and its doc line.

A key's doc is the comment right above its field in `arguments/params.py` (one convention: params.py stays plain
Python with a comment above each field, and the help can never drift from it). Read from the source with `ast`.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache
from typing import Any

from arguments.params import Config

# the help text's width (lines are wrapped to it) and the indent of the doc lines
WIDTH = 118
DOC_INDENT = " " * 6


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The doc of each field of dataclass `cls`: its comment lines right above it (no blank line between), joined
    into one line; '' for a field without one."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (a bytecode-only install): keys still listed, docs not
        return {}
    lines = source.splitlines()
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    docs = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            above, k = [], item.lineno - 2  # lineno is 1-based: the line above is lines[lineno - 2]
            while k >= 0 and lines[k].strip().startswith("#"):
                above.insert(0, lines[k].strip().lstrip("#").strip())
                k -= 1
            docs[item.target.id] = " ".join(above)
    return docs


def format_value(value: Any) -> str:
    """A default as an override would write it (`Section.key=<this>`): true/false, null, [a, b], numbers as Python
    prints them (YAML reads them back), strings as they are ("" when empty)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def sections(cfg: Config | None = None) -> list[tuple[str, Any]]:
    """(section name, its dataclass instance) in file order; '' for the top-level keys (seed, device, ...)."""
    cfg = cfg if cfg is not None else Config()
    groups = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    return [("", cfg)] + [(name, getattr(cfg, name)) for name in groups]


def config_keys(cfg: Config | None = None) -> list[tuple[str, Any, str]]:
    """Every config key as (dotted name, default, doc), by section in file order."""
    keys = []
    for section, obj in sections(cfg):
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if section == "" and dataclasses.is_dataclass(value):
                continue  # a section, listed under its own heading
            keys.append((f"{section}.{f.name}" if section else f.name, value, docs.get(f.name, "")))
    return keys


def config_help() -> str:
    """The help text: a heading per section, then `Section.key = default` and its doc line (wrapped) per key."""
    out = [textwrap.fill("config keys, with their defaults (set them in the --opt YAML by section, or on the "
                         "command line as Section.key=value; top-level keys as key=value):", WIDTH)]
    heading = None
    for dotted, value, doc in config_keys():
        section = dotted.rpartition(".")[0] or "top level"
        if section != heading:
            out += ["", f"{section}:"]
            heading = section
        out.append(f"  {dotted} = {format_value(value)}")
        out.append(textwrap.fill(doc or "(undocumented)", WIDTH, initial_indent=DOC_INDENT,
                                 subsequent_indent=DOC_INDENT, break_on_hyphens=False))
    return "\n".join(out)
