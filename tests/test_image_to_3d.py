"""Image-to-3D (GenerateCamParams.ref_image): loading and keying the picture, the reference view, its loss, a short
run that moves the render towards the picture, and (slow) form_path.py + train.py end to end."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import form_path
import train
from arguments import ConfigError, load_config
from arguments.checks import check_config
from gaussian_renderer import render
from scene import GaussianModel, circle_cameras
from stages.reference_view import load_reference_view, reference_camera, reference_losses, reference_scores
from utils.reference_image import KEY_TOLERANCE, fit_to_size, load_reference

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def save(array: np.ndarray, path: Path) -> Path:
    """Write a uint8 [H, W, 3|4] array as a PNG."""
    Image.fromarray(array, "RGBA" if array.shape[-1] == 4 else "RGB").save(path)
    return path


def object_on_white(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A red rectangle with a white hole inside, on plain white; and its true mask (hole included)."""
    image = np.full((h, w, 3), 255, np.uint8)
    image[10:30, 20:45] = (200, 30, 30)
    image[15:20, 25:30] = 255  # white inside the object: not connected to the border, stays foreground
    mask = np.zeros((h, w), np.float32)
    mask[10:30, 20:45] = 1.0
    return image, mask


def config_error(tmp_path, picture) -> str:
    """The error train.py stops with (from the config checks, before anything is written)."""
    out = tmp_path / "out"
    cfg = load_config(SMOKE, [f"GenerateCamParams.ref_image={picture}", f"ModelParams.output_root={out}"])
    with pytest.raises(ConfigError) as err:
        train.main(cfg)
    assert not out.exists()
    return str(err.value)


# ---------------------------------------------------------------------------------------------- loading and keying
def test_rgba_uses_its_alpha(tmp_path):
    image, mask = object_on_white()
    alpha = (mask * 255).astype(np.uint8)
    alpha[12, 22] = 128  # a half-transparent pixel keeps its value
    ref = load_reference(save(np.dstack([image, alpha]), tmp_path / "a.png"))
    assert not ref.keyed and ref.background is None
    np.testing.assert_allclose(ref.mask, alpha / 255.0, atol=1e-6)
    np.testing.assert_allclose(ref.rgb[20, 40], np.array([200, 30, 30]) / 255.0, atol=1e-6)


def test_rgb_on_plain_white_is_keyed_by_the_border_median(tmp_path):
    image, mask = object_on_white()
    noise = np.random.default_rng(0).integers(-8, 9, image.shape)  # JPEG-like noise, within the tolerance
    noisy = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
    assert 8 / 255 < KEY_TOLERANCE
    ref = load_reference(save(noisy, tmp_path / "white.png"))
    assert ref.keyed
    np.testing.assert_allclose(ref.background, np.median(np.concatenate(
        [noisy[0], noisy[-1], noisy[1:-1, 0], noisy[1:-1, -1]]), axis=0) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ref.mask, mask)  # the hole, white but enclosed, is foreground
    # an RGBA picture whose alpha is opaque everywhere is keyed the same way
    opaque = load_reference(save(np.dstack([noisy, np.full(mask.shape, 255, np.uint8)]), tmp_path / "opaque.png"))
    assert opaque.keyed
    np.testing.assert_array_equal(opaque.mask, mask)


def test_pictures_read_upright_and_deep_grey_refused(tmp_path):
    """An EXIF orientation tag (6: turn 90 degrees clockwise to show, a phone held upright) is applied, as viewers
    do; a 16-bit grey PNG, which Pillow's convert() would clip at 255 (nearly all white), is refused in one line."""
    from utils.reference_image import ReferenceImageError

    image, _ = object_on_white()
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[10:30, 20:45, 3] = 200  # a translucent object: the alpha is the mask, no keying
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "sideways.png"
    Image.fromarray(rgba, "RGBA").save(path, exif=exif)
    ref = load_reference(path)
    shown = np.rot90(rgba, k=-1)  # clockwise
    assert ref.mask.shape == shown.shape[:2] == (60, 40)
    np.testing.assert_allclose(ref.mask, shown[..., 3] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ref.rgb, shown[..., :3] / 255.0, atol=1e-6)
    grey = np.zeros((16, 16), np.uint16)
    grey[4:12, 4:12] = 20000  # mid-grey square on black
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    with pytest.raises(ReferenceImageError, match="mode I;16") as err:
        load_reference(tmp_path / "grey16.png")
    assert "\n" not in str(err.value) and "grey16.png" in str(err.value) and "8-bit" in str(err.value)


def test_fit_to_size_pads_centred_then_resizes(tmp_path):
    """A 20 x 40 (rows x columns) picture whose left half is the object, fitted to 16 x 16: padded to 40 x 40 with 10
    background rows above and below, so the object fills rows 4..12 and columns 0..8 of the result."""
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:, :20] = (10, 200, 60, 255)
    ref = fit_to_size(load_reference(save(rgba, tmp_path / "wide.png")), 16, 16)
    assert ref.mask.shape == (16, 16) and ref.rgb.shape == (16, 16, 3)
    assert ref.mask.mean() == pytest.approx(20 * 20 / (40 * 40), abs=0.01)  # area kept
    assert ref.mask[8, 3] == pytest.approx(1.0) and ref.mask[8, 12] == pytest.approx(0.0)
    assert ref.mask[1, 3] == pytest.approx(0.0) and ref.mask[14, 3] == pytest.approx(0.0)
    np.testing.assert_allclose(ref.rgb[8, 3], np.array([10, 200, 60]) / 255.0, atol=1e-5)
    np.testing.assert_allclose(ref.rgb[8, 7], np.array([10, 200, 60]) / 255.0, atol=1e-5)  # edge: un-premultiplied


@pytest.mark.parametrize("case", ["noisy_border", "missing", "not_an_image", "no_object"])
def test_bad_pictures_are_refused_in_one_line(tmp_path, case):
    if case == "noisy_border":
        picture = save(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8), tmp_path / "n.png")
        want = "not a plain background"
    elif case == "missing":
        picture, want = tmp_path / "nothing.png", "is not a file"
    elif case == "not_an_image":
        picture, want = tmp_path / "text.png", "is not a picture"
        picture.write_text("hello")
    else:
        picture, want = save(np.full((16, 16, 3), 255, np.uint8), tmp_path / "white.png"), "shows no object"
    message = config_error(tmp_path, picture)
    assert "\n" not in message and message.startswith("GenerateCamParams.ref_image '") and want in message
    assert any(fix in message for fix in ("give", "RGBA")), message  # says how to fix it


def test_example_config_and_picture(monkeypatch):
    """configs/image_to_3d_toy.yaml passes the checks; its picture is RGBA (its alpha is the mask, nothing keyed)."""
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the checkout's root, where the scripts run
    cfg = load_config(ROOT / "configs" / "image_to_3d_toy.yaml")
    check_config(cfg)
    ref = load_reference(ROOT / cfg.GenerateCamParams.ref_image)
    assert not ref.keyed and 0.05 < ref.mask.mean() < 0.5


def test_sf3d_needs_a_picture(tmp_path):
    cfg = load_config(SMOKE, ["GenerateCamParams.init_shape=sf3d"])
    with pytest.raises(ConfigError, match="GenerateCamParams.ref_image="):
        check_config(cfg)


def test_sf3d_without_the_package_starts_from_the_sphere(tmp_path, capsys):
    """No sf3d here: one line on stderr saying how to install it, and exactly the sphere initialisation."""
    import importlib.util

    from scene.initialization import initial_point_cloud, sphere_points

    if importlib.util.find_spec("sf3d") is not None:
        pytest.skip("sf3d is installed here")

    image, _ = object_on_white()
    cfg = load_config(SMOKE, ["GenerateCamParams.init_shape=sf3d", "GenerateCamParams.init_num_pts=50",
                              f"GenerateCamParams.ref_image={save(image, tmp_path / 'p.png')}"])
    cloud = initial_point_cloud(cfg.GenerateCamParams, np.random.default_rng(0))
    np.testing.assert_array_equal(cloud.points, sphere_points(50, np.random.default_rng(0)).points)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "sphere" in err[0]


# ---------------------------------------------------------------------------------------------- view and loss
def test_reference_camera_is_the_front_test_view():
    c = load_config(SMOKE).GenerateCamParams
    cam = reference_camera(c)
    front = circle_cameras(c, 8, False)[0]  # stock's first test view: azimuth 0
    torch.testing.assert_close(cam.full_proj_transform, front.full_proj_transform)
    # Z up, azimuth 0 = front = +Y: the eye sits on +Y at the default radius, polar 90
    torch.testing.assert_close(cam.camera_center, torch.tensor([0.0, c.default_radius, 0.0]), atol=1e-6, rtol=0)
    assert cam.FoVy == c.default_fovy and (cam.image_width, cam.image_height) == (c.image_w, c.image_h)


def test_reference_losses_by_hand():
    image = torch.tensor([[[0.5, 0.9]], [[0.2, 0.1]], [[0.9, 0.3]]])  # [3, 1, 2]
    ref = torch.tensor([[[0.1, 0.0]], [[0.2, 0.0]], [[0.4, 0.0]]])
    mask = torch.tensor([[[1.0, 0.0]]])
    alpha = torch.tensor([[[0.7, 0.4]]], requires_grad=True)
    image.requires_grad_(True)
    rgb_loss, mask_loss = reference_losses(image, alpha, ref, mask)
    # pixel 0 in the mask: (0.4^2 + 0^2 + 0.5^2) / (3 * 2 pixels); pixel 1 outside: ignored
    assert rgb_loss.item() == pytest.approx((0.16 + 0.0 + 0.25) / 6)
    assert mask_loss.item() == pytest.approx((0.3 ** 2 + 0.4 ** 2) / 2)
    (rgb_loss + mask_loss).backward()
    assert torch.all(image.grad[:, 0, 1] == 0)  # no colour gradient outside the mask
    torch.testing.assert_close(image.grad[:, 0, 0], 2 * torch.tensor([0.4, 0.0, 0.5]) / 6)
    torch.testing.assert_close(alpha.grad, torch.tensor([[[2 * (0.7 - 1.0) / 2, 2 * (0.4 - 0.0) / 2]]]))


# ---------------------------------------------------------------------------------------------- a short run
def reference_picture(cfg, path: Path) -> Path:
    """The toy world's blue cylinder rendered by the project's renderer at the reference view, saved as RGBA (colour
    un-composited from the white background)."""
    from toyworld.world import ToyObject, object_splats

    with torch.no_grad():
        pkg = render(reference_camera(cfg.GenerateCamParams), object_splats(ToyObject("cylinder", "blue"), n=2000),
                     torch.ones(3), backend="torch")
    alpha = pkg["alpha"][0].clamp(0, 1)
    rgb = ((pkg["render"] - (1 - alpha)) / alpha.clamp(min=1e-3)).clamp(0, 1)
    rgba = torch.cat([rgb, alpha[None]]).permute(1, 2, 0).numpy()
    return save((rgba * 255).round().astype(np.uint8), path)


SHORT_RUN = ["GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64", "GenerateCamParams.init_num_pts=500",
             "GuidanceParams.C_batch_size=2", "PTDParams.mode=off", "save_video=false",
             "OptimizationParams.iterations=40", "OptimizationParams.warmup_iter=20",
             "OptimizationParams.densify_from_iter=10", "OptimizationParams.densify_until_iter=35",
             "OptimizationParams.densification_interval=10", "OptimizationParams.opacity_reset_interval=100",
             "OptimizationParams.save_iterations=[1]", "OptimizationParams.test_ratio=1",
             "OptimizationParams.checkpoint_interval=0"]


def scores_at(cfg, ref, iteration: int) -> dict:
    g = GaussianModel(0)
    g.load_ply(str(Path(cfg.ModelParams.output_root) / "run" / "point_cloud" / f"iteration_{iteration}" /
                   "point_cloud.ply"))
    with torch.no_grad():
        pkg = render(ref.camera, g, torch.ones(3), backend="torch")
    return reference_scores(pkg["render"], pkg["alpha"], ref.rgb, ref.mask)


def test_short_run_moves_the_reference_view_towards_the_picture(tmp_path):
    """40 iterations of the smoke config (tiny random prior, 64 px, from the grey sphere) with a picture of the blue
    cylinder: measured here mask IoU 0.69 -> 0.84 and colour error 0.356 -> 0.261 (iteration 1 -> 40)."""
    base = load_config(SMOKE, SHORT_RUN)
    picture = reference_picture(base, tmp_path / "cylinder.png")
    cfg = load_config(SMOKE, [*SHORT_RUN, f"ModelParams.output_root={tmp_path}", "ModelParams.workspace=run",
                              f"GenerateCamParams.ref_image={picture}"])
    train.main(cfg)
    ref = load_reference_view(cfg, torch.device("cpu"))
    first, last = scores_at(cfg, ref, 1), scores_at(cfg, ref, 40)
    assert last["mask_iou"] > first["mask_iou"] + 0.1, (first, last)
    assert last["colour_error"] < 0.8 * first["colour_error"], (first, last)


# ---------------------------------------------------------------------------------------------- end to end (slow)
TINY_RUN = ["GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=300",
            "OptimizationParams.iterations=8", "OptimizationParams.warmup_iter=4",
            "OptimizationParams.densify_from_iter=2", "OptimizationParams.densify_until_iter=7",
            "OptimizationParams.densification_interval=3", "OptimizationParams.opacity_reset_interval=6",
            "OptimizationParams.save_iterations=[4]", "OptimizationParams.test_ratio=1",
            "OptimizationParams.video_frames=4", "OptimizationParams.checkpoint_interval=3",
            "PTDParams.total_steps=6", "PTDParams.num_views=6", "PTDParams.path_epochs=2",
            "PTDParams.checkpoint_interval=1", "GuidanceParams.C_batch_size=2"]


def final_ply(cfg) -> bytes:
    return train.final_ply_path(cfg).read_bytes()


@pytest.mark.slow
def test_image_to_3d_end_to_end(tmp_path):
    """form_path.py + train.py (PTD weighted) with a reference picture; the reference losses are logged and fall."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    picture = reference_picture(load_config(SMOKE, TINY_RUN), tmp_path / "cylinder.png")
    cfg = load_config(SMOKE, [*TINY_RUN, f"ModelParams.output_root={tmp_path}", "ModelParams.workspace=i2d",
                              f"GenerateCamParams.ref_image={picture}",
                              "OptimizationParams.opacity_reset_interval=100"])  # a reset would raise both losses
    form_path.main(cfg)
    ply = train.main(cfg)
    run = tmp_path / "i2d"
    assert ply.is_file() and (run / "train_done.json").is_file() and (run / "path_lora" / "ptd_path.json").is_file()
    assert (run / "videos" / "8_iteration" / "video_rgb_8.mp4").stat().st_size > 0
    assert load_config(run / "config.yaml").GenerateCamParams.ref_image == str(picture)
    events = EventAccumulator(str(run))
    events.Reload()
    for tag in ("loss/ref_rgb", "loss/ref_mask"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 8 and values[-1] < values[0], (tag, values)


@pytest.mark.slow
def test_reference_hook_at_zero_weight_changes_nothing(tmp_path):
    """The hook draws no random number and touches nothing else: with both weights 0, a run with a picture ends with
    the same PLY bytes as the stock run without one."""
    picture = reference_picture(load_config(SMOKE, TINY_RUN), tmp_path / "cylinder.png")
    stock = load_config(SMOKE, [*TINY_RUN, "PTDParams.mode=off", f"ModelParams.output_root={tmp_path}",
                                "ModelParams.workspace=stock", "save_video=false"])
    zero = load_config(SMOKE, [*TINY_RUN, "PTDParams.mode=off", f"ModelParams.output_root={tmp_path}",
                               "ModelParams.workspace=zero", "save_video=false",
                               f"GenerateCamParams.ref_image={picture}", "OptimizationParams.lambda_ref_rgb=0",
                               "OptimizationParams.lambda_ref_mask=0"])
    train.main(stock)
    train.main(zero)
    assert final_ply(stock) == final_ply(zero)
