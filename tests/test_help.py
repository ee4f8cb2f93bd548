"""`--help` of the entry scripts lists every config key, by section, with its default and the doc line from the comment
above its field in arguments/params.py."""
import dataclasses
import re
from dataclasses import dataclass
from typing import List, Optional

import pytest

import batch
import form_path
import probe_ood
import train
from arguments import Config, yaml_load
from arguments.help import field_docs

KEY_LINE = re.compile(r"^  (\S+) = (.*)$")


def help_text(cli, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def listed_keys(text: str) -> dict[str, tuple[str, str]]:
    """dotted key -> (default as shown, doc) from the help's config part."""
    keys, current = {}, None
    for line in text.split("config keys", 1)[1].splitlines():
        match = KEY_LINE.match(line)
        if match:
            current = match.group(1)
            keys[current] = (match.group(2), "")
        elif line.startswith("      ") and current:
            shown, doc = keys[current]
            keys[current] = (shown, f"{doc} {line.strip()}".strip())
        elif not line.startswith(" "):
            current = None  # a section heading or a blank line
    return keys


def every_field() -> list[tuple[str, dataclasses.Field, object]]:
    """(dotted key, field, default) of every leaf field of the config, straight from the dataclasses."""
    cfg, out = Config(), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += [(f"{f.name}.{g.name}", g, getattr(value, g.name)) for g in dataclasses.fields(value)]
        else:
            out.append((f.name, f, value))
    return out


def test_train_help_lists_every_key_with_its_default_and_a_doc_line(capsys):
    keys = listed_keys(help_text(train.cli, capsys))
    fields = every_field()
    assert sorted(keys) == sorted(dotted for dotted, _, _ in fields)
    for dotted, f, default in fields:
        shown, doc = keys[dotted]
        if isinstance(default, str):  # a string override takes the text as written
            assert shown == (default or '""'), dotted
        else:  # what is shown, written as an override's value, gives the default back
            assert yaml_load(shown) == default and type(yaml_load(shown)) is type(default), (dotted, shown)
        assert doc and doc != "(undocumented)", f"{dotted} has no doc line: write a comment above it in params.py"
    # the doc is the comment above the field, multi-line comments joined
    assert keys["OptimizationParams.iterations"][1] == "stage-2 iterations (>= 1)"
    assert keys["GuidanceParams.LoRA_path"][1].startswith("stock's LoRA_path: a lora_diffusion .safetensors file")
    assert keys["GuidanceParams.LoRA_path"][1].endswith("UNet and text-encoder LoRA, textual-inversion tokens")


def test_help_groups_keys_by_section_in_file_order(capsys):
    text = help_text(train.cli, capsys).split("config keys", 1)[1]
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    sections = [f.name for f in dataclasses.fields(Config) if f.name[0].isupper()]
    assert headings[-len(sections) - 1:] == ["top level", *sections]
    for section in sections:  # a section's keys follow its heading, and only its keys
        block = text.split(f"\n{section}:\n", 1)[1].split("\n\n", 1)[0]
        names = [m.group(1) for m in map(KEY_LINE.match, block.splitlines()) if m]
        assert names and all(n.startswith(f"{section}.") for n in names)


@pytest.mark.parametrize("script", [form_path, batch, probe_ood])
def test_every_script_sharing_the_config_lists_it(script, capsys):
    keys = listed_keys(help_text(script.cli, capsys))
    assert sorted(keys) == sorted(dotted for dotted, _, _ in every_field())


@dataclass
class _Commented:
    # one line
    a: int = 1
    # first line
    # second line
    b: List[float] = dataclasses.field(default_factory=lambda: [0.5])
    c: Optional[str] = None
    # a comment with a blank line below it is not the next field's doc

    d: bool = True


def test_field_docs_reads_the_comments_above_the_fields():
    assert field_docs(_Commented) == {"a": "one line", "b": "first line second line", "c": "", "d": ""}
