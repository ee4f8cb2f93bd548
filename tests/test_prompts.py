"""Prompt lists in both formats, including the paper's 415 (read from the shared copy when present)."""
import json
from pathlib import Path

import pytest

from utils.prompts import read_prompts, slugify

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreamfusion_prompts.txt"


def test_plain_text_and_threestudio_json(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "lib.json").write_text(json.dumps({"dreamfusion": ["a", "b"], "magic3d": ["c"]}))
    assert read_prompts(f"{tmp_path / 'lib.json'}:magic3d") == ["c"]
    with pytest.raises(ValueError, match="needs a key.*dreamfusion"):
        read_prompts(str(tmp_path / "lib.json"))
    with pytest.raises(ValueError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.skipif(not SHARED.is_file(), reason="shared prompt list not present")
def test_paper_prompt_list_has_415(tmp_path):
    prompts = read_prompts(str(SHARED))
    assert len(prompts) == 415
    (tmp_path / "prompt_library.json").write_text(json.dumps({"dreamfusion": prompts}))
    assert read_prompts(f"{tmp_path / 'prompt_library.json'}:dreamfusion") == prompts


def test_slugify():
    assert slugify("A DSLR photo of a bagel, filled!") == "a_dslr_photo_of_a_bagel_filled"
