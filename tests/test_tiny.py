"""The offline tiny model set: real architectures, loadable with the production call, no hub."""
import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from guidance.tiny import build_tiny_tokenizer, tiny_model_path


def test_tiny_folder_is_a_diffusers_pipeline(tiny_path):
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_path / part).is_dir()
    assert tiny_model_path("epsilon") == tiny_path  # cached, not rebuilt


def test_round_trip_gives_identical_unet_outputs(tiny_path, tmp_path):
    a = StableDiffusionPipeline.from_pretrained(tiny_path)
    a.save_pretrained(tmp_path / "copy")
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "copy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        out_a = a.unet(x, 10, encoder_hidden_states=emb).sample
        out_b = b.unet(x, 10, encoder_hidden_states=emb).sample
    assert torch.equal(out_a, out_b)


def test_sd21_base_schedule_and_vae_factor(tiny_pipe, tiny_v_path):
    sched = tiny_pipe.scheduler.config
    assert sched.steps_offset == 1 and sched.beta_schedule == "scaled_linear"
    assert (sched.beta_start, sched.beta_end, sched.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert sched.prediction_type == "epsilon"
    assert tiny_pipe.vae_scale_factor == 8
    assert StableDiffusionPipeline.from_pretrained(tiny_v_path).scheduler.config.prediction_type == "v_prediction"


def test_samples_64px_with_20_ddim_steps_offline(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    images = tiny_pipe("a bagel", num_inference_steps=20, height=64, width=64, generator=g, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    g = torch.Generator().manual_seed(0)
    again = tiny_pipe("a bagel", num_inference_steps=20, height=64, width=64, generator=g, output_type="np").images
    assert np.array_equal(images, again)


def test_full_vocabulary_reproduces_open_clip_token_ids(tmp_path):
    import open_clip

    tok = build_tiny_tokenizer(tmp_path / "tok", num_merges=49152 - 256 - 2)
    assert len(tok) == 49408
    text = "a DSLR photo of a bagel filled with cream cheese and lox."
    ours = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    ref = open_clip.tokenize([text])[0].tolist()
    n = ref.index(49407) + 1  # open_clip pads with 0 after the end token
    assert ours[:n] == ref[:n]


def test_tokenizer_pads_to_77(tiny_pipe):
    ids = tiny_pipe.tokenizer("a cat", padding="max_length", max_length=tiny_pipe.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and len(tiny_pipe.tokenizer) < 1100


def test_first_build_prints_nothing_and_restores_progress_bars(tmp_path, capfd):
    """Building the set on first use (a fresh machine) writes nothing to stderr, where the scripts' one-line error
    contract is checked, and leaves transformers' progress-bar setting as it found it."""
    from transformers.utils import logging as tf_logging

    assert tf_logging.is_progress_bar_enabled()
    folder = tiny_model_path("epsilon", root=tmp_path)
    assert (folder / "model_index.json").is_file()
    assert "Writing model shards" not in capfd.readouterr().err
    assert tf_logging.is_progress_bar_enabled()
