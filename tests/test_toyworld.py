"""The toy world against closed forms: surfaces, normals, volumes, captions, scores; its training scripts' resume."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import imageio
import numpy as np
import pytest
import torch

from toyworld.world import (COLOURS, SHAPES, ToyObject, all_objects, inside, object_splats, parse_prompt,
                            surface_samples, view_of_azimuth, volume)


@pytest.mark.parametrize("shape", SHAPES)
def test_surface_samples_lie_on_the_surface_with_outward_normals(shape):
    rng = np.random.default_rng(0)
    pts, normals = surface_samples(shape, 4000, rng)
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0)
    eps = 1e-3
    # a step along the normal leaves the solid, a step against it enters (edges aside: allow a sliver)
    assert np.mean(~inside(shape, pts + eps * normals)) > 0.99
    assert np.mean(inside(shape, pts - eps * normals)) > 0.99


@pytest.mark.parametrize("shape", SHAPES)
def test_occupancy_volume_matches_the_closed_form(shape):
    rng = np.random.default_rng(1)
    n = 400_000
    box = rng.uniform(-0.6, 0.6, (n, 3))
    estimate = inside(shape, box).mean() * 1.2 ** 3
    assert estimate == pytest.approx(volume(shape), rel=0.02)


@pytest.mark.parametrize("shape", SHAPES)
def test_surface_sampling_is_area_uniform(shape):
    """Equal-area halves of the bounding box's z range hold point counts in proportion to their surface areas: checked
    against the cone's and cylinder's closed-form split (side vs base/caps) through the normals' z component."""
    rng = np.random.default_rng(2)
    pts, normals = surface_samples(shape, 200_000, rng)
    flat = np.abs(normals[:, 2]) > 0.999  # on a base or cap (or the cube's top/bottom faces)
    expected = {"sphere": 0.0, "cube": 2 / 6,
                "cone": math.pi * 0.5 ** 2 / (math.pi * 0.5 * (0.5 + math.hypot(0.5, 0.9))),
                "cylinder": 2 * 0.26 ** 2 / (2 * 0.26 * (0.26 + 1.0))}[shape]
    assert flat.mean() == pytest.approx(expected, abs=0.01)


def test_prompts_round_trip_and_views():
    objects = all_objects()
    assert len(objects) == len(SHAPES) * len(COLOURS) * 2
    for obj in objects:
        assert parse_prompt(obj.text) == obj
        assert parse_prompt(obj.caption("side")) == obj
    assert ToyObject("cone", "blue", True).caption("back") == "a blue cone with a purple front, back view"
    assert [view_of_azimuth(a) for a in (0, 44, 46, -90, 134, 136, -180, 540)] == \
        ["front", "front", "side", "side", "side", "back", "back", "back"]
    with pytest.raises(ValueError, match="one toy shape"):
        parse_prompt("a DSLR photo of a bagel")


def test_front_attribute_is_seen_from_the_front_only():
    from scene.cameras import orbit_camera
    from gaussian_renderer import render

    purple = torch.tensor([0.55, 0.16, 0.78])
    obj = ToyObject("cube", "yellow", True)
    splats = object_splats(obj, 3000)

    def purple_fraction(azimuth):
        img = render(orbit_camera(4.0, 90, azimuth, 0.55, 48, 48), splats, torch.ones(3), backend="torch")["render"]
        chroma = img.detach() / img.detach().amax(0, keepdim=True).clamp_min(1e-6)
        target = purple / purple.max()
        return float(((chroma - target[:, None, None]).abs().sum(0) < 0.15).float().mean())

    assert purple_fraction(0) > 0.15  # front: the purple face fills much of the view
    assert purple_fraction(180) < 0.01  # back: none


def test_scores_closed_form_identities():
    from toyworld.score import colour_error, silhouette_iou

    a = torch.zeros(2, 8, 8)
    a[:, :4] = 1.0
    b = torch.zeros(2, 8, 8)
    b[:, 2:6] = 1.0
    assert silhouette_iou(a, a) == 1.0
    assert silhouette_iou(a, b) == pytest.approx(2 / 6)  # rows 2-3 shared, rows 0-5 covered
    assert silhouette_iou(a, 1 - a) == 0.0
    rgb = torch.rand(2, 3, 8, 8)
    assert colour_error(rgb, rgb, a, a) == 0.0
    assert colour_error(rgb, rgb + 0.25, a, b) == pytest.approx(0.25)
    assert colour_error(rgb, rgb, a, 1 - a) == 1.0


def test_ground_truth_scores_itself_and_tells_shapes_and_colours_apart():
    from toyworld.score import score_model

    torch.set_num_threads(1)
    for obj in (ToyObject("cylinder", "red"),):
        s = score_model(object_splats(obj, 3000, seed=7), obj.text, resolution=32)  # other samples than the truth
        assert s["iou"] > 0.9 and s["colour_error"] < 0.05
        assert s["shape_ok"] and s["colour_ok"]
    s = score_model(object_splats(ToyObject("sphere", "blue"), seed=3), "a yellow cone", resolution=32)
    assert s["best_shape"] == "sphere" and not s["shape_ok"] and s["nearest_colour"] == "blue"
    assert s["iou"] < 0.7 and s["aligned_iou"] < 0.7
    assert s["shape_ious"]["sphere"] > 0.95  # the scale search finds the sphere at its own size


class _IdentityAutoencoder:
    """encode -> decode is the identity (AutoencoderKL's interface as autoencoder_round_trip uses it)."""
    dtype = torch.float32

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


def test_round_trip_colour_identity_and_toy_autoencoder():
    from guidance.sd_utils import TOY_PRIOR_DIR
    from toyworld.score import score_model
    from toyworld.train_clip import load_autoencoder

    torch.set_num_threads(1)
    model = object_splats(ToyObject("cone", "green"), 3000, seed=5)
    # an autoencoder that changes nothing: the colour "as the prior sees it" is the rendered one (up to the float
    # rounding of the [0, 1] <-> [-1, 1] rescaling)
    s = score_model(model, "a green cone", resolution=32, vae=_IdentityAutoencoder())
    assert s["round_trip_colour"] == pytest.approx(s["mean_colour"], abs=1e-6)
    assert s["round_trip_colour_distances"] == pytest.approx(s["colour_distances"], abs=1e-6)
    assert s["round_trip_nearest_colour"] == s["nearest_colour"] == "green"
    # the committed prior's autoencoder shifts colours but keeps ground-truth objects nearest their own colour
    vae = load_autoencoder(TOY_PRIOR_DIR)
    for colour in ("red", "green", "blue", "yellow"):
        obj = ToyObject("cone", colour)
        s = score_model(object_splats(obj, 3000, seed=5), obj.text, resolution=32, vae=vae)
        assert s["round_trip_colour_ok"], (colour, s["round_trip_colour_distances"])
        assert s["round_trip_colour"] != s["mean_colour"]  # it did go through the autoencoder


def test_composite_backgrounds_and_flips():
    from toyworld.data import composite

    rgba = torch.zeros(64, 4, 4, 4, dtype=torch.uint8)
    rgba[:, :, :2] = torch.tensor([200, 0, 0, 255], dtype=torch.uint8)  # left half opaque red, right half empty
    out = composite(rgba, torch.Generator().manual_seed(0))
    red = torch.tensor([200 / 255, 0, 0])[:, None]
    left, right = out[..., :2].flatten(2), out[..., 2:].flatten(2)  # [B, 3, 8]
    unflipped = torch.isclose(left, red, atol=1e-6).all(dim=(1, 2))
    flipped = torch.isclose(right, red, atol=1e-6).all(dim=(1, 2))
    assert (unflipped ^ flipped).all() and 10 < int(flipped.sum()) < 54
    bg = torch.where(unflipped[:, None, None], right, left)  # the empty half: one background colour per image
    assert torch.allclose(bg, bg[..., :1].expand_as(bg))
    colours = bg[..., 0]
    white = (colours == 1).all(1)
    black = (colours == 0).all(1)
    assert white.any() and black.any() and (~white & ~black).any()


def test_broad_composite_widens_only_the_picked_share():
    """broad 0 is composite() on the same random stream; broad 1 recolours every object (a red object's pixels are no
    longer red) and stays in [0, 1]; a float RGBA composites as its uint8 original does; a checkpoint written before
    --vae-broad existed resumes as broad 0 (the default is 0.5 since 2026-12-01)."""
    from toyworld.data import broad_composite, composite
    from toyworld.train_prior import LATER_SETTINGS, parse_args

    rgba = torch.zeros(32, 16, 16, 4, dtype=torch.uint8)
    rgba[:, 4:12, 4:12] = torch.tensor([200, 0, 0, 255], dtype=torch.uint8)  # an opaque red square in the middle
    plain = composite(rgba, torch.Generator().manual_seed(3))
    assert torch.equal(broad_composite(rgba, torch.Generator().manual_seed(3), 0.0), plain)
    assert torch.equal(composite(rgba.float() / 255, torch.Generator().manual_seed(3)), plain)
    wide = broad_composite(rgba, torch.Generator().manual_seed(3), 1.0)
    assert wide.shape == plain.shape and wide.min() >= 0 and wide.max() <= 1
    def red_like(images):  # [B] the square's centre (flips keep it in place) is the red it was drawn with
        centre = images[..., 7:9, 7:9].mean(dim=(2, 3))
        return (centre[:, 0] > 0.6) & (centre[:, 1:] < 0.15).all(1)

    assert red_like(plain).all()
    assert int(red_like(wide).sum()) <= 4  # (a permutation that keeps red, bright enough, no speck there: rare)
    assert not torch.equal(wide, broad_composite(rgba, torch.Generator().manual_seed(4), 1.0))
    assert LATER_SETTINGS["vae_broad"] == 0.0 and parse_args([]).vae_broad == 0.5  # old checkpoints: 0; default 0.5


def test_textured_backgrounds_only_behind_the_object():
    """composite(textured=0) draws exactly the stream of the plain one (a checkpoint made before the textured
    augmentation existed resumes bit for bit); textured=1 changes only the empty pixels, to non-flat fields."""
    from toyworld.data import composite

    g = torch.Generator().manual_seed(1)
    rgba = torch.randint(0, 256, (16, 8, 8, 4), generator=g, dtype=torch.uint8)
    rgba[..., 3] = 0
    rgba[:, :, :4] = 255  # left half opaque white
    rgba[:, :, 4:, :3] = 0  # premultiplied: empty pixels carry no colour
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain, zero = composite(rgba, g1), composite(rgba, g2, textured=0.0)
    assert torch.equal(plain, zero) and torch.equal(g1.get_state(), g2.get_state())
    tex = composite(rgba, torch.Generator().manual_seed(5), textured=1.0, flip=False)
    assert torch.equal(tex[..., :4], torch.ones_like(tex[..., :4]))  # the object is untouched
    empty = tex[..., 4:].flatten(2)
    assert (empty.std(dim=2) > 0.01).all()  # every background is a field, not one colour


def test_autoencoder_round_trip_replaces_only_the_picked_rows():
    from diffusers import AutoencoderKL
    from toyworld.train_clip import autoencoder_round_trip

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4).eval()
    images = torch.rand(4, 3, 16, 16)
    pick = torch.tensor([True, False, True, False])
    out = autoencoder_round_trip(images, pick, vae)
    assert torch.equal(out[~pick], images[~pick])
    x = images[pick] * 2 - 1
    ref = ((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(out[pick], ref, atol=1e-6) and not torch.allclose(out[pick], images[pick], atol=1e-2)


def test_clip_loss_matches_brute_force():
    from toyworld.train_clip import contrastive_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    targets = torch.tensor([0, 2, 0, 1, 2])
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    li = sum(-torch.log_softmax(logits[i], 0)[targets[i]] for i in range(5)) / 5
    lt = 0.0
    for j in range(3):
        members = [i for i in range(5) if targets[i] == j]
        lt += sum(-torch.log_softmax(logits[:, j], 0)[i] for i in members) / len(members)
    assert float(contrastive_loss(img, txt, targets, scale)) == pytest.approx(float((li + lt / 3) / 2), rel=1e-6)


@pytest.mark.slow
def test_train_prior_refuses_a_decay_start_past_its_steps(tmp_path, capsys):
    """The default recipe decays from step 7,000, so a shorter run must say which flag to change, before any work."""
    from toyworld import train_prior

    assert train_prior.main(["--unet-steps", "500", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--unet-decay-from 7000" in err and "0 for a constant" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_train_prior_resume_equals_uninterrupted(tmp_path):
    """A run stopped after the first UNet step and resumed writes the same weights as one never stopped; a
    checkpoint is never silently reused by a run with other settings."""
    from safetensors.torch import load_file

    from toyworld import train_prior

    common = ["--views", "1", "--batch", "2", "--vae-batch", "2", "--vae-steps", "2", "--unet-steps", "2",
              "--unet-decay-from", "0", "--decoder-steps", "0", "--checkpoint-every", "1", "--threads", "1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train_prior.main(common + ["--work", str(whole), "--out", str(whole / "out")]) == 0
    args = common + ["--work", str(part), "--out", str(part / "out")]
    assert train_prior.main(args + ["--stop-after", "3"]) == 0  # 2 autoencoder steps, 1 UNet step
    assert not (part / "out").exists()
    assert train_prior.main(args) == 2  # a checkpoint exists: --resume or start over, never silently
    other = list(args)
    other[other.index("--vae-steps") + 1] = "3"
    assert train_prior.main(other + ["--resume"]) == 2  # other settings are refused
    assert train_prior.main(args + ["--resume"]) == 0
    for sub in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        a, b = load_file(whole / "out" / sub), load_file(part / "out" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(whole / "out"))
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the data
    assert json.loads((whole / "out" / "training_args.json").read_text())["unet_steps"] == 2
    # more UNet steps on --resume of a finished run = asking for them from the start (constant learning rate)
    longer = list(common)
    longer[longer.index("--unet-steps") + 1] = "3"
    long = tmp_path / "long"
    assert train_prior.main(longer + ["--work", str(long), "--out", str(long / "out")]) == 0
    assert train_prior.main(longer + ["--work", str(whole), "--out", str(whole / "out"), "--resume"]) == 0
    a, b = (load_file(d / "out" / "unet/diffusion_pytorch_model.safetensors") for d in (long, whole))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fewer = list(common)
    fewer[fewer.index("--unet-steps") + 1] = "1"
    assert train_prior.main(fewer + ["--work", str(whole), "--out", str(whole / "out"), "--resume"]) == 2
    # a decay added on resume from the saved step on = that schedule from the start; once decaying, no new length
    decayed = list(common)
    decayed[decayed.index("--unet-steps") + 1] = "4"
    decayed += ["--unet-decay-from", "3"]
    fresh = tmp_path / "fresh"
    assert train_prior.main(decayed + ["--work", str(fresh), "--out", str(fresh / "out")]) == 0
    assert train_prior.main(decayed + ["--work", str(long), "--out", str(long / "out"), "--resume"]) == 0
    a, b = (load_file(d / "out" / "unet/diffusion_pytorch_model.safetensors") for d in (fresh, long))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c) for k, c in load_file(
        whole / "out" / "unet/diffusion_pytorch_model.safetensors").items())
    again = list(decayed)
    again[again.index("--unet-steps") + 1] = "5"
    assert train_prior.main(again + ["--work", str(long), "--out", str(long / "out"), "--resume"]) == 2
    # the decoder phase: added to a finished run = asked for from the start; the encoder (and so every latent the UNet
    # saw) is untouched, the decoder changes; more UNet steps after it are refused
    dec = decayed + ["--decoder-steps", "2", "--decoder-noise", "0.5"]
    fresh_dec = tmp_path / "fresh_dec"
    assert train_prior.main(dec + ["--work", str(fresh_dec), "--out", str(fresh_dec / "out")]) == 0
    assert train_prior.main(dec + ["--work", str(long), "--out", str(long / "out"), "--resume"]) == 0
    vae = "vae/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(d / "out" / vae) for d in (fresh_dec, long, fresh))
    assert a.keys() == c.keys() and all(torch.equal(a[k], b[k]) for k in a)
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(a[k], c[k]) for k in encoder)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("decoder."))
    u = "unet/diffusion_pytorch_model.safetensors"
    assert all(torch.equal(x, load_file(fresh / "out" / u)[k]) for k, x in load_file(fresh_dec / "out" / u).items())
    more = list(dec)
    more[more.index("--unet-steps") + 1] = "5"
    assert train_prior.main(more + ["--work", str(long), "--out", str(long / "out"), "--resume"]) == 2
    # a longer, decaying UNet phase and a decoder phase added in one --resume of a finished constant-rate run (a
    # checkpoint of the old defaults resumed with the new ones) = both asked for from the start
    once = tmp_path / "once"
    assert train_prior.main(common + ["--work", str(once), "--out", str(once / "out")]) == 0
    assert train_prior.main(dec + ["--work", str(once), "--out", str(once / "out"), "--resume"]) == 0
    for sub in (u, vae, "text_encoder/model.safetensors"):
        a, b = load_file(fresh_dec / "out" / sub), load_file(once / "out" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_extends_decoder_accepts_only_additions():
    from toyworld.train_prior import extends_decoder

    base = {"unet_steps": 100}  # from before the decoder phase existed: no decoder settings recorded
    dec = {"decoder_steps": 50, "decoder_noise": 0.6, "decoder_lr": 1e-4}
    assert extends_decoder(base, {**base, **dec}, "done")  # a finished run gets a decoder phase
    assert extends_decoder(base, {**base, **dec}, "unet")  # before it begins, any decoder settings
    assert not extends_decoder(base, {**base, **dec, "unet_steps": 200}, "done")  # with another setting: no
    ran = {**base, **dec}
    assert extends_decoder(ran, {**ran, "decoder_steps": 80}, "decoder")
    assert extends_decoder(ran, {**ran, "decoder_steps": 80}, "done")
    assert not extends_decoder(ran, {**ran, "decoder_steps": 30}, "done")  # fewer
    assert not extends_decoder(ran, {**ran, "decoder_steps": 80, "decoder_noise": 0.3}, "decoder")  # other noise


def test_unet_learning_rate_schedule():
    """Warm-up over 100 steps, constant, then (with decay_from) a straight line to zero at the last step."""
    from toyworld.train_prior import warmup_decay_lr as unet_lr

    assert unet_lr(0, 1.0, 1000) == pytest.approx(0.01) and unet_lr(99, 1.0, 1000) == 1.0
    assert unet_lr(999, 1.0, 1000) == 1.0  # no decay: constant to the end
    assert unet_lr(699, 2.0, 1000, 700) == 2.0 and unet_lr(700, 2.0, 1000, 700) == 2.0
    assert unet_lr(850, 2.0, 1000, 700) == pytest.approx(1.0) and unet_lr(999, 2.0, 1000, 700) == pytest.approx(2 / 300)


def test_extends_unet_accepts_only_schedules_that_keep_done_steps():
    from toyworld.train_prior import extends_unet

    base = {"vae_steps": 3, "unet_steps": 100, "unet_lr": 1e-3}  # a checkpoint from before --unet-decay-from
    now = lambda **kw: {**base, "unet_decay_from": 0, **kw}  # noqa: E731
    assert extends_unet(base, now(unet_steps=200), "done", 100)
    assert extends_unet(base, now(unet_steps=200, unet_decay_from=100), "done", 100)
    assert extends_unet(base, now(unet_decay_from=80), "unet", 60)  # same length, decay from a step still to come
    assert not extends_unet(base, now(unet_decay_from=50), "unet", 60)  # would change steps 50-59
    assert not extends_unet(base, now(unet_decay_from=50), "done", 100)
    assert not extends_unet(base, now(unet_steps=50), "unet", 40)  # shorter
    assert not extends_unet(base, now(unet_steps=200, unet_lr=2e-3), "done", 100)  # another setting
    assert not extends_unet(base, now(unet_steps=200), "vae", 2)
    decaying = {**base, "unet_decay_from": 50}
    assert extends_unet(decaying, {**decaying, "unet_steps": 200}, "unet", 40)  # the decay had not begun
    assert not extends_unet(decaying, {**decaying, "unet_steps": 200}, "unet", 60)


def test_study_summary_of_synthetic_runs():
    from toyworld.study import RUN_NAME, markdown, summarise

    m = RUN_NAME.match("a_blue_cone__ptd-checkpoints__s1__0123abcd")
    assert m and m["arm"] == "ptd-checkpoints" and m["seed"] == "1"
    rows = []
    for arm, curve in (("vanilla", [0.5, 0.6, 0.7]), ("ptd", [0.55, 0.72, 0.74])):
        for seed, shift in ((0, -0.02), (1, 0.02)):
            for it, iou in zip((100, 200, 300), curve):  # aligned IoU: the curve; raw IoU falls (tells them apart)
                rows.append({"arm": arm, "seed": seed, "iteration": it, "aligned_iou": iou + shift,
                             "iou": 0.9 - (iou + shift), "colour_error": 0.1, "toy_clip": 20.0 + 10 * seed,
                             "shape_ok": seed == 0, "colour_ok": True, "round_trip_colour_ok": arm == "ptd",
                             "matching_loss": 1.0 + it / 1000})
    s = summarise(rows)
    assert s["vanilla"]["aligned_iou"] == pytest.approx((0.7, 0.02))
    assert s["vanilla"]["iou"] == pytest.approx((0.2, 0.02)) and s["ptd"]["iou_curve"][100] == pytest.approx(0.35)
    assert s["ptd"]["shape_ok"] == 0.5 and s["ptd"]["runs"] == 2
    assert s["ptd"]["round_trip_colour_ok"] == 1.0 and s["vanilla"]["round_trip_colour_ok"] == 0.0
    assert s["vanilla"]["reaches_vanilla_final_at"] == 300 and s["ptd"]["reaches_vanilla_final_at"] == 200
    assert s["ptd"]["loss_curve"][200] == pytest.approx(1.2)
    assert s["ptd"]["toy_clip"] == pytest.approx((25.0, 5.0))
    assert s["ptd"]["clip_curve"][300] == pytest.approx(25.0) and s["vanilla"]["colour_curve"][100] == 0.1
    # vanilla's best mean is its final (0.7) here; paired: same shift per seed, so every pair differs by the curves'
    assert s["ptd"]["reaches_vanilla_best_at"] == 200
    assert s["ptd"]["paired"][100] == pytest.approx((0.05, 0.0, 2)) and "paired" not in s["vanilla"]
    assert s["ptd"]["paired_loss"][200] == pytest.approx((0.0, 0.0, 2))  # same loss curve in both arms
    text = markdown(s, 0)
    assert "| 50% | 100% | 100% | 200 |" in text  # best shape right, nearest colour right, ... through the autoencoder
    assert "| ptd | +0.050 +- 0.000 (2) | +0.120 +- 0.000 (2) | +0.040 +- 0.000 (2) |" in text


def test_study_toy_clip_reached_and_paired(tmp_path):
    """The toy-CLIP score has its own "reaches vanilla's final / best at" and paired table, as the aligned IoU has;
    vanilla's best toy-CLIP mean before its end is the stricter level."""
    from toyworld.study import markdown, plot, summarise

    rows = []
    for arm, clips, colours in (("vanilla", [30.0, 65.0, 60.0], [0.3, 0.2, 0.1]), ("ptd", [40.0, 62.0, 66.0],
                                                                                   [0.3, 0.25, 0.05])):
        for seed, shift in ((0, -1.0), (1, 1.0)):
            for it, clip, colour in zip((100, 200, 300), clips, colours):
                rows.append({"arm": arm, "prompt": "p", "seed": seed, "iteration": it, "aligned_iou": 0.5,
                             "iou": 0.5, "colour_error": colour, "toy_clip": clip + shift, "shape_ok": True,
                             "colour_ok": True, "round_trip_colour_ok": True, "matching_loss": None})
    s = summarise(rows)
    assert s["vanilla"]["clip_reaches_vanilla_final_at"] == 200 and s["vanilla"]["clip_reaches_vanilla_best_at"] == 200
    assert s["ptd"]["clip_reaches_vanilla_final_at"] == 200 and s["ptd"]["clip_reaches_vanilla_best_at"] == 300
    assert s["ptd"]["paired_clip"] == {100: pytest.approx((10.0, 0.0, 2)), 200: pytest.approx((-3.0, 0.0, 2)),
                                       300: pytest.approx((6.0, 0.0, 2))}
    assert s["ptd"]["paired_colour"][200] == pytest.approx((0.05, 0.0, 2)) and "paired_clip" not in s["vanilla"]
    text = markdown(s, 0)
    assert "| ptd | +10.000 +- 0.000 (2) | -3.000 +- 0.000 (2) | +6.000 +- 0.000 (2) |" in text
    s["ptd"]["clip_reaches_vanilla_best_at"] = None  # an arm that never gets there says so
    assert [line for line in markdown(s, 0).splitlines() if line.startswith("| ptd | 2 |")][0].endswith("| never |")
    plot(s, tmp_path / "study.png")  # three panels side by side: IoU, toy CLIP, matching loss
    height, width = imageio.v3.imread(tmp_path / "study.png").shape[:2]
    assert width >= 3 * height
    (ptd_row,) = [line for line in text.splitlines() if line.startswith("| ptd | 2 | 300 |")]
    assert ptd_row.endswith("| 100 | 100 | 200 | 300 |")  # IoU (flat: at once), then toy CLIP: final, best


def test_study_paired_differences_and_best():
    """Pairs match on (prompt, seed): a run without its vanilla partner is left out; the standard error is the
    sample std over pairs / sqrt(pairs); vanilla's best can come before its end."""
    from toyworld.study import summarise

    def row(arm, prompt, seed, it, iou):
        return {"arm": arm, "prompt": prompt, "seed": seed, "iteration": it, "aligned_iou": iou, "iou": iou,
                "colour_error": 0.0, "toy_clip": 0.0, "shape_ok": True, "colour_ok": True,
                "round_trip_colour_ok": True, "matching_loss": None}

    rows = [row("vanilla", "a", 0, 50, 0.5), row("vanilla", "a", 0, 100, 0.9), row("vanilla", "a", 0, 150, 0.8),
            row("vanilla", "b", 0, 50, 0.3), row("vanilla", "b", 0, 100, 0.7), row("vanilla", "b", 0, 150, 0.6),
            row("ptd", "a", 0, 50, 0.7), row("ptd", "a", 0, 100, 0.9), row("ptd", "a", 0, 150, 0.8),
            row("ptd", "b", 0, 50, 0.4), row("ptd", "b", 0, 100, 0.7), row("ptd", "b", 0, 150, 0.6),
            row("ptd", "c", 0, 50, 0.0)]  # no vanilla partner
    rows[0]["matching_loss"], rows[6]["matching_loss"] = 0.5, 0.75  # ("a", 50): the only pair with both losses
    s = summarise(rows)
    assert s["ptd"]["paired_loss"] == {50: pytest.approx((0.25, 0.0, 1))}
    assert s["vanilla"]["reaches_vanilla_final_at"] == 100 and s["vanilla"]["reaches_vanilla_best_at"] == 100
    diffs = [0.2, 0.1]
    assert s["ptd"]["paired"][50] == pytest.approx((0.15, np.std(diffs, ddof=1) / np.sqrt(2), 2))
    assert s["ptd"]["paired"][100] == pytest.approx((0.0, 0.0, 2))
    # ptd's mean at 50 includes the unpaired run: (0.7 + 0.4 + 0.0) / 3
    assert s["ptd"]["aligned_curve"][50] == pytest.approx(1.1 / 3)


def test_study_tables_from_its_csv(tmp_path, capsys):
    """A study's committed CSV gives back the rows it was written from (types, None, booleans), and `--from-csv`
    makes the same tables as the rows did; a CSV without the needed columns is a one-line error, nothing written."""
    from toyworld.study import main, markdown, read_rows, rows_csv, summarise

    rows = []
    for arm, base in (("vanilla", 0.6), ("ptd", 0.7)):
        for seed in (0, 1):
            for it in (20, 40):
                rows.append({"run": f"a_red_cube__{arm}__s{seed}__00ff", "prompt": "a red cube", "arm": arm,
                             "seed": seed, "iteration": it, "iou": base / 2, "aligned_iou": base + it / 1000 + seed / 7,
                             "colour_error": 0.125, "toy_clip": 61.25 + seed, "shape_ok": seed == 0,
                             "colour_ok": True, "best_shape": "cube", "nearest_colour": None,
                             "round_trip_colour_ok": False, "round_trip_nearest_colour": "red",
                             "matching_loss": None if it == 20 else 0.5 + seed / 3,
                             "matching_loss_current": None, "matching_loss_posthoc": None})
    back = read_rows(rows_csv(rows))
    assert back == rows  # floats through repr survive exactly
    csv_path = tmp_path / "toy_study.csv"
    csv_path.write_text(rows_csv(rows))
    assert main([str(tmp_path / "tables"), "--from-csv", str(csv_path)]) == 0
    assert (tmp_path / "tables" / "toy_study.md").read_text() == markdown(summarise(rows), 0)
    assert (tmp_path / "tables" / "toy_study.png").is_file()
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("arm,seed\nvanilla,0\n")
    assert main([str(tmp_path / "bad_out"), "--from-csv", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.csv" in err and "iteration" in err
    assert not (tmp_path / "bad_out").exists()


def test_probe_summary_over_prompts():
    """Mean +- std over prompts of each prompt's means, per timestep and overall, for each reading."""
    from toyworld.study import probe_markdown, probe_summary

    def report(prompt, scale):
        side = lambda base: {"by_t": [{"t": t, "mean": base * scale * (2 if t == 50 else 1), "std": 9.0, "n": 16}  # noqa: E731
                                      for t in (50, 950)], "overall": {"mean": base * scale, "std": 9.0, "n": 16}}
        return {"prompt": prompt, "space": "eps", "norm": "RMS", "num_generated": 16, "num_refs": 32,
                "rows_by_reading": {"refs_only": {"rendered": side(2.0), "generated": side(1.0)},
                                    "self_included": {"rendered": side(1.0), "generated": side(1.0)}}}

    reports = [report("a red cube", 1.0), report("a blue cone", 3.0)]
    s = probe_summary(reports)
    assert s["refs_only"]["t"] == [50, 950]
    assert s["refs_only"]["rendered"][0] == pytest.approx((8.0, 4.0))  # t=50: 4 and 12
    assert s["refs_only"]["generated"][2] == pytest.approx((2.0, 1.0))  # overall: 1 and 3
    text = probe_markdown(s, reports)
    assert "| overall | 4.0000 +- 2.0000 | 2.0000 +- 1.0000 | 2.000 |" in text and "self_included" in text


def test_committed_toy_clip_knows_the_world():
    """The committed toy CLIP (evaluate.py --clip-models toy) names clean ground-truth renders: shape and colour of
    each of the 16 plain objects from two sides (measured: see the closing assertion's margin in docs/toyworld.md)."""
    from evaluation.clip import load_scorer
    from scene.cameras import orbit_camera
    from gaussian_renderer import render

    torch.set_num_threads(1)
    scorer = load_scorer("toy", None)
    objects = all_objects(fronts=False)
    prompts = [o.text for o in objects]
    images = torch.stack([render(orbit_camera(4.0, 75, az, 0.5, 64, 64), object_splats(o, 3000), torch.ones(3),
                                 backend="torch")["render"].detach().clamp(0, 1)
                          for o in objects for az in (30, -120)])
    pred = (scorer.image_features(images) @ scorer.text_features(prompts).T).argmax(1)
    truth = torch.arange(len(objects)).repeat_interleave(2)
    assert float((pred == truth).float().mean()) >= 0.9


def test_model_key_toy_resolves_to_the_committed_prior():
    from guidance.sd_utils import TOY_PRIOR_DIR, resolve_model_key

    assert resolve_model_key("toy") == str(TOY_PRIOR_DIR)
    assert (TOY_PRIOR_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_card_views_and_ground_truth_ceiling():
    """The card's azimuths lie in the range their caption names (view_of_azimuth); the ground-truth reference
    classifies clean renders of plain objects from the side right, and the accuracy counts attributes apart."""
    from evaluation.clip import load_scorer
    from toyworld.card import accuracy, ground_truth_ceiling, view_azimuths

    for view in ("front", "side", "back"):
        assert {view_of_azimuth(a) for a in view_azimuths(view)} == {view}
    assert len(view_azimuths("plain")) == 12
    objects = [ToyObject("cube", "red"), ToyObject("cone", "blue"), ToyObject("cube", "red", True)]
    acc = accuracy([2, 1, 0], [0, 1, 2], objects)  # red cube <-> red cube with a purple front swapped
    assert acc == {"prompt": pytest.approx(1 / 3), "shape": 1.0, "colour": 1.0, "front": pytest.approx(1 / 3)}
    torch.set_num_threads(1)
    out = ground_truth_ceiling(objects[:2], "side", load_scorer("toy", None))
    assert set(out) == {"clean"} and out["clean"]["prompt"] == 1.0


def test_score_cli_round_trip_on_a_ply(tmp_path):
    """`python -m toyworld.score model.ply --prompt ... --round-trip` (a bare PLY: the toy prior's autoencoder) writes
    the round-trip colour into toy_score.json and a three-row picture: the views, the same through the autoencoder,
    the ground truth."""
    import json

    from scene.gaussian_model import GaussianModel
    from toyworld import score

    torch.set_num_threads(1)
    splats = object_splats(ToyObject("sphere", "green"), 800, seed=2)
    model = GaussianModel(0)
    model.create_from_pcd(splats.xyz.numpy(), splats.rgb.numpy(), 1.0)
    ply = tmp_path / "model.ply"
    model.save_ply(str(ply))
    assert score.main([str(ply), "--prompt", "a green sphere", "--round-trip"]) == 0
    s = json.loads((tmp_path / "toy_score.json").read_text())
    assert s["object"] == "a green sphere" and set(s["round_trip_colour_distances"]) == set(COLOURS)
    assert s["round_trip_nearest_colour"] in COLOURS and len(s["round_trip_colour"]) == 3
    assert imageio.v3.imread(tmp_path / "toy_score_views.png").shape[:2] == (3 * 64, 8 * 64)
    assert score.main([str(ply), "--prompt", "a green sphere"]) == 0  # without: two rows, no round-trip keys
    assert "round_trip_colour" not in json.loads((tmp_path / "toy_score.json").read_text())
    assert imageio.v3.imread(tmp_path / "toy_score_views.png").shape[:2] == (2 * 64, 8 * 64)


def test_committed_weights_keep_the_size_budget():
    """The issue's budget for the committed toy models (prior + toy CLIP + card): at most 25 MB."""
    weights = Path(__file__).resolve().parents[1] / "toyworld" / "weights"
    total = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
    assert total <= 25_000_000, f"toyworld/weights holds {total / 1e6:.2f} MB, over the 25 MB budget"


@pytest.mark.slow
def test_train_clip_fine_tunes_from_a_written_clip(tmp_path, capsys):
    """--init starts from a written toy CLIP (its fp16 weights, its log going on), --decay-from is accepted, and a
    folder without weights is a one-line error with nothing written."""
    from safetensors.torch import load_file

    from evaluation.clip import TOY_CLIP_NAME
    from toyworld import train_clip

    common = ["--views", "1", "--batch", "4", "--steps", "2", "--domain-from", "5", "--threads", "1",
              "--work", str(tmp_path / "work")]
    first, second = tmp_path / "first", tmp_path / "second"
    assert train_clip.main(common + ["--out", str(first)]) == 0
    (tmp_path / "work" / "clip_checkpoint.pt").unlink()
    assert train_clip.main(common + ["--out", str(second), "--init", str(first), "--decay-from", "1"]) == 0
    log = json.loads((second / "training_log.json").read_text())
    from toyworld.train_prior import expand_log
    log, before = (expand_log(json.loads((d / "training_log.json").read_text())) for d in (second, first))
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[:2] == before and {r["phase"] for r in log} == {"clip"}
    record = json.loads((second / "training_args.json").read_text())
    assert record["init"] == str(first) and record["decay_from"] == 1 and record["init_args"]["init"] == ""
    model, _ = train_clip.build_model(1, tmp_path / "work")
    train_clip.load_init(model, first)
    a = load_file(str(first / f"{TOY_CLIP_NAME}.safetensors"))
    assert all(torch.equal(v.half(), a[k]) for k, v in model.state_dict().items())
    b = load_file(str(second / f"{TOY_CLIP_NAME}.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # trained on
    (tmp_path / "work" / "clip_checkpoint.pt").unlink()
    capsys.readouterr()
    assert train_clip.main(common + ["--out", str(tmp_path / "third"), "--init", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init") and "\n" not in err and not (tmp_path / "third").exists()


def test_compact_log_round_trip():
    """The committed log's columns read back as the per-step rows (rounded), in order; old list logs pass through."""
    from toyworld.train_prior import compact_log, expand_log

    rows = [{"phase": "vae", "step": 1, "loss": 0.123456789, "seconds": 1.26},
            {"phase": "vae", "step": 2, "loss": 0.1, "seconds": 2.0},
            {"phase": "unet", "step": 1, "loss": 1.5e-5, "seconds": 3.04}]
    back = expand_log(json.loads(json.dumps(compact_log(rows))))
    assert back == [{**rows[0], "loss": 0.123457, "seconds": 1.3}, rows[1], {**rows[2], "seconds": 3.0}]
    assert expand_log(rows) is rows
