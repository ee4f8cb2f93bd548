"""guidance/hf_compat.py: the diffusers spellings picked by version (bench/oldest_deps.sh runs the old releases)."""
import diffusers
import pytest
import torch

from guidance.hf_compat import dtype_kwargs, lora_weight_name, require_lora_metadata


@pytest.mark.parametrize("version, key", [("0.34.0", "torch_dtype"), ("0.39.9", "torch_dtype"), ("0.40.0", "dtype"),
                                          ("0.43.0.dev0", "dtype"), ("1.0.0", "dtype")])
def test_dtype_keyword_follows_the_installed_release(monkeypatch, version, key):
    monkeypatch.setattr(diffusers, "__version__", version)
    assert dtype_kwargs(torch.float16) == {key: torch.float16}
    assert dtype_kwargs(None) == {}


def test_releases_without_lora_metadata_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", "0.33.1")
    with pytest.raises(RuntimeError, match=r"needs diffusers>=0\.34 \(found 0\.33\.1") as err:
        require_lora_metadata("Saving a LoRA folder")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(diffusers, "__version__", "0.34.0")
    require_lora_metadata("Saving a LoRA folder")


def test_lora_weight_name(tmp_path):
    assert lora_weight_name(tmp_path / "missing") is None
    assert lora_weight_name(tmp_path) is None  # no file: diffusers reports it
    (tmp_path / "mine.safetensors").write_bytes(b"")
    assert lora_weight_name(tmp_path) == "mine.safetensors"
    (tmp_path / "other.safetensors").write_bytes(b"")
    assert lora_weight_name(tmp_path) is None  # ambiguous: left to diffusers
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert lora_weight_name(tmp_path) == "pytorch_lora_weights.safetensors"
