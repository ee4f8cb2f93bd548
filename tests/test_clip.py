"""CLIP scorer with a tiny open_clip config (random weights): same numbers as a direct open_clip computation."""
import json

import open_clip
import pytest
import torch
from PIL import Image

from evaluation.clip import ClipScorer

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "ptd-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "ptd-tiny-clip.json")
    torch.manual_seed(0)
    return ClipScorer.load("ptd-tiny-clip", None)


def test_matches_direct_open_clip(tiny_clip):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 48, 40, generator=g)
    ours = tiny_clip.similarity(images, "a cat")
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    with torch.no_grad():
        fi = tiny_clip.model.encode_image(torch.stack([tiny_clip.preprocess(p) for p in pil]))
        ft = tiny_clip.model.encode_text(open_clip.tokenize(["a cat"]))
    ref = 100 * torch.nn.functional.cosine_similarity(fi, ft.expand_as(fi), dim=-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours, tiny_clip.similarity(images, "a cat"))  # deterministic
    assert ours.shape == (3,) and (ours.abs() <= 100).all()


def test_missing_weights_offline_is_one_line(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Failed to download weights for ViT-L-14 openai")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    with pytest.raises(ValueError, match="not available offline") as err:
        ClipScorer.load("ViT-L-14", "openai")
    assert "\n" not in str(err.value)
