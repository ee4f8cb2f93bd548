"""The offline tiny model set: Stable Diffusion's real architectures at toy size, random weights.

`tiny_model_path()` builds (once, cached, fixed seed) a normal diffusers `StableDiffusionPipeline` folder, so the code
that loads `stabilityai/stable-diffusion-2-1-base` loads this one with the same `from_pretrained(path)` call. Nothing
here touches a model hub: the tokenizer is made from the CLIP BPE vocabulary that open_clip_torch ships.

Sizes: UNet (32, 64) channels (~1.4 M parameters), a four-block VAE (downsampling factor 8, like SD's), a 2-layer CLIP
text encoder, SD 2.1-base's DDIM schedule (scaled-linear betas 0.00085..0.012, steps_offset 1, leading spacing).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from pathlib import Path

from utils.files import atomic_folder

# bumped whenever the architecture or the build changes, so an old cache is never reused
TINY_VERSION = 1
# merges kept from the CLIP BPE (vocabulary = 512 byte tokens + merges + 2 specials ~ 1,000 tokens)
TINY_MERGES = 486
PREDICTION_TYPES = ("epsilon", "v_prediction")


def default_cache_root() -> Path:
    """Where tiny models are cached: $PTD_TINY_CACHE, else ~/.cache/ptd."""
    return Path(os.environ.get("PTD_TINY_CACHE", Path.home() / ".cache" / "ptd"))


def tiny_model_path(prediction_type: str = "epsilon", root: str | os.PathLike | None = None) -> Path:
    """Return the folder of the tiny StableDiffusionPipeline, building it on first use.

    Args:
        prediction_type: "epsilon" (like SD 2.1-base) or "v_prediction" (like SD 2.1 768).
        root: cache folder (default: `default_cache_root()`).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"tiny model prediction_type '{prediction_type}' is not one of {PREDICTION_TYPES}")
    root = Path(root) if root is not None else default_cache_root()
    folder = root / f"tiny-sd-{prediction_type}-v{TINY_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    with atomic_folder(folder, keep_existing=True) as tmp:  # a concurrent builder may have won, which is fine
        pipe = build_tiny_pipeline(prediction_type)
        with _quiet_transformers_progress():  # the first build must not print to stderr (one-line error contracts)
            pipe.save_pretrained(tmp)
    return folder


@contextlib.contextmanager
def _quiet_transformers_progress():
    """transformers' own progress bars (e.g. "Writing model shards") off inside, as they were after."""
    from transformers.utils import logging as tf_logging

    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """Build the tiny pipeline in memory with a fixed seed (the global RNG is left untouched)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_tiny_tokenizer(Path(tok_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_tokenizer(folder: Path, num_merges: int = TINY_MERGES):
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) into `folder` and load it.

    The vocabulary follows CLIP's construction: the 256 byte characters, the same with the end-of-word marker, the
    first `num_merges` merges, then <|startoftext|> and <|endoftext|>.
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    merges = _clip_bpe_merges()[:num_merges]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # CLIPTokenizer(vocab_file=...) silently ignores the files in transformers 5: load from the folder instead
    return CLIPTokenizer.from_pretrained(str(folder))


def _clip_bpe_merges() -> list[str]:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return lines[1:49152 - 256 - 2 + 1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in codes)))
