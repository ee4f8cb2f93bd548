"""Prompt lists: plain text (one per line) or threestudio's `load/prompt_library.json` with a key.

`FILE.json:dreamfusion` is the paper's 415 DreamFusion prompts. The list is not shipped with this project: get it
from threestudio (https://github.com/threestudio-project/threestudio, file load/prompt_library.json).
"""
from __future__ import annotations

import json
import re
from pathlib import Path


def read_prompts(spec: str, keep_empty: bool = False) -> list[str]:
    """Read prompts from `FILE.txt` or `FILE.json:KEY` (a JSON list, or a dict of lists selected by KEY).

    Blank lines of a .txt are separators, never prompts. An empty string in a JSON list is an entry: dropped, or
    kept with `keep_empty` (batch.py runs it as a job, which then fails with the reason, in its place in the list)."""
    path_str, key = spec, None
    match = re.match(r"^(.*\.json):([^/\\]+)$", spec)
    if match:
        path_str, key = match.group(1), match.group(2)
    path = Path(path_str)
    if not path.is_file():
        raise ValueError(f"prompt file '{path}' not found; pass a .txt (one prompt per line) or FILE.json:KEY")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file '{path}' is not valid JSON (line {err.lineno})") from None
        if isinstance(data, dict):
            if key is None or key not in data:
                keys = ", ".join(sorted(map(str, data))[:8])
                raise ValueError(f"prompt file '{path}' needs a key: use {path}:KEY with KEY one of {keys}")
            data = data[key]
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"prompt file '{path}'{':' + key if key else ''} is not a list of strings")
        prompts = [p.strip() for p in data if p.strip() or keep_empty]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file '{spec}' holds no prompts")
    return prompts


def slugify(text: str, max_len: int = 60) -> str:
    """A folder-safe name for a prompt."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_len] or "prompt"
