"""Strict configs: unknown keys and wrong types fail with one line naming the key and its closest valid key."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from arguments import ConfigError, Config, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_stock_luciddreamer():
    cfg = Config()
    g, o, c = cfg.GuidanceParams, cfg.OptimizationParams, cfg.GenerateCamParams
    assert (g.guidance_scale, g.lambda_guidance, g.delta_t, g.delta_t_start, g.xs_delta_t, g.xs_inv_steps) == \
        (7.5, 0.1, 80, 100, 200, 5)
    assert g.t_range == [0.02, 0.5] and g.max_t_range == 0.98 and g.C_batch_size == 4
    assert (o.iterations, o.warmup_iter, o.densify_grad_threshold, o.opacity_reset_interval) == \
        (5000, 1500, 0.00075, 300)
    assert c.fovy_range == [0.32, 0.60] and c.radius_range == [5.2, 5.5] and c.init_num_pts == 100_000
    assert (cfg.PTDParams.total_steps, cfg.PTDParams.power, cfg.PTDParams.lora_rank) == (1000, 0.3, 4)
    assert cfg.PTDParams.mode == "off"


def test_yaml_and_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, """
        seed: 3
        GuidanceParams:
          text: a bagel
          guidance_scale: 5
        """)
    cfg = load_config(path, ["GuidanceParams.guidance_scale=6", "ModelParams.workspace=foo",
                             "GenerateCamParams.fovy_range=[0.1, 0.2]"])
    assert cfg.seed == 3 and cfg.GuidanceParams.text == "a bagel"
    assert cfg.GuidanceParams.guidance_scale == 6.0 and isinstance(cfg.GuidanceParams.guidance_scale, float)
    assert cfg.ModelParams.workspace == "foo" and cfg.GenerateCamParams.fovy_range == [0.1, 0.2]


def test_misspelt_key_in_yaml_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, """
        GuidanceParams:
          guidance_scal: 5
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "'GuidanceParams.guidance_scal'" in msg and "did you mean 'guidance_scale'" in msg


def test_misspelt_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'GuidanceParam'.*'GuidanceParams'"):
        load_config(None, ["GuidanceParam.text=x"])
    with pytest.raises(ConfigError, match="'OptimizationParams.iteration'.*did you mean 'iterations'"):
        load_config(None, ["OptimizationParams.iteration=10"])


@pytest.mark.parametrize("override, expected", [
    ("GuidanceParams.guidance_scale=abc", "expected a number"),
    ("OptimizationParams.iterations=1.5", "expected an integer"),
    ("ModelParams.white_background=maybe", "expected true or false"),
    ("GenerateCamParams.fovy_range=0.3", "expected a list"),
    ("seed=2024-01-01", "expected an integer, got '2024-01-01'"),
])
def test_wrong_types_are_rejected(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("text, expected", [
    ("GuidanceParams:\n  text: [1]\n", "expected a string, got \\[1\\]"),
    ("ModelParams:\n  workspace: 007\n", "got 7 \\(YAML read an integer\\); put the value in quotes"),
    ("GuidanceParams:\n  text: true\n", "got True \\(YAML read a boolean\\)"),
])
def test_a_file_value_yaml_reads_as_another_type_says_how_to_quote(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("key, value", [
    ("GuidanceParams.text", "a photo of a cat #1 wearing a hat"),  # YAML: a comment from ' #'
    ("ModelParams.workspace", "run #2"),
    ("GuidanceParams.text", "a cat: studio photo"),  # YAML: a mapping
    ("ModelParams.workspace", "007"),  # YAML: the integer 7
    ("ModelParams.workspace", "2024-01-01"),  # YAML 1.1: a date
    ("GuidanceParams.negative", "true"),
    ("GuidanceParams.text", "[V] dog, 'quoted' & {braced}"),
    ("GuidanceParams.text", "  spaced  "),
    ("PTDParams.path_lora", "/runs/a #1/path_lora"),  # Optional[str]
    ("GenerateCamParams.init_path", "mesh: v2.glb"),
])
def test_string_overrides_are_taken_as_written(key, value):
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value


def test_optional_string_override_null_is_none_and_empty_stays_empty():
    assert load_config(None, ["PTDParams.path_lora=/x", "PTDParams.path_lora=null"]).PTDParams.path_lora is None
    assert load_config(None, ["GuidanceParams.prior_lora=~"]).GuidanceParams.prior_lora is None
    assert load_config(None, ["PTDParams.path_lora="]).PTDParams.path_lora == ""
    assert load_config(None, ["GuidanceParams.text=null"]).GuidanceParams.text == "null"  # a plain str key: as written


def test_non_string_overrides_are_still_yaml_and_integers_are_decimal():
    cfg = load_config(None, ["seed=010", "GuidanceParams.noise_seed=1_000", "OptimizationParams.iterations=0x10",
                             "GuidanceParams.t_range=[0.1, 0.4]  # a comment", "ModelParams.white_background=false"])
    assert (cfg.seed, cfg.GuidanceParams.noise_seed, cfg.OptimizationParams.iterations) == (10, 1000, 16)
    assert cfg.GuidanceParams.t_range == [0.1, 0.4] and cfg.ModelParams.white_background is False
    with pytest.raises(ConfigError, match="expected an integer, got '1:30'"):  # YAML 1.1 read 90 (base 60)
        load_config(None, ["seed=1:30"])


def test_a_file_reads_dates_and_leading_zeros_as_yaml_1_2(tmp_path):
    cfg = load_config(write(tmp_path, """
        seed: 010
        GuidanceParams:
          text: 2024-01-01
          negative: =
        """))
    assert cfg.seed == 10 and cfg.GuidanceParams.text == "2024-01-01" and cfg.GuidanceParams.negative == "="


@pytest.mark.parametrize("value", ["1e5", "0o17", "010", "2024-01-01", "off", "null", "a: b", "x #y", "1:30", "0x1f"])
def test_string_values_yaml_would_misread_round_trip(tmp_path, value):
    cfg = load_config(None, [f"ModelParams.workspace={value}", f"GuidanceParams.text={value}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["GuidanceParams"]["text"] == value


CLI = ("import argparse, sys; from arguments import parse_cli; p = argparse.ArgumentParser(); "
       "p.add_argument('--resume', action='store_true'); p.add_argument('--arm', nargs='+', action='append'); "
       "cfg, a = parse_cli(sys.argv[1:], p); "
       "print(cfg.OptimizationParams.iterations, cfg.seed, cfg.GuidanceParams.text, a.resume, a.arm, sep='|')")


@pytest.mark.parametrize("argv, expected", [
    (["--resume", "OptimizationParams.iterations=40"], "40|0||True|None"),
    (["seed=3", "--resume", "OptimizationParams.iterations=40", "GuidanceParams.text=a cat #1"],
     "40|3|a cat #1|True|None"),
    # a flag that takes several words keeps every word up to the next flag (batch.py's --arm NAME overrides...)
    (["--arm", "fast", "seed=1", "--resume", "seed=2"], "5000|2||True|[['fast', 'seed=1']]"),
])
def test_overrides_are_accepted_after_flags(argv, expected):
    out = subprocess.run([sys.executable, "-c", CLI, *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr


def write_bytes(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("text, expected", [
    ("GuidanceParams:\n  text: a\n  guidance_scale: 5\n  text: b\n",
     "key 'GuidanceParams.text' is given twice \\(lines 2 and 4\\); keep one"),
    ("GuidanceParams:\n  text: a\nPTDParams:\n  mode: off\nGuidanceParams:\n  negative: b\n",
     "section 'GuidanceParams' is given twice \\(lines 1 and 5\\); merge them"),
    ("seed: 1\nsave_video: true\nseed: 2\n", "key 'seed' is given twice \\(lines 1 and 3\\)"),
    ("GuidanceParams:\n  t_range: [0.1, 0.2]\n  't_range': [0.2, 0.3]\n", "'GuidanceParams.t_range' is given twice"),
])
def test_a_key_given_twice_in_a_file_is_refused(tmp_path, text, expected):
    path = write_bytes(tmp_path, "cfg.yaml", text.encode())
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    path = write_bytes(tmp_path, "cfg.yaml", b"GenerateCamParams:\n  fovy_range: &f [0.3, 0.5]\n"
                                             b"  max_fovy_range: *f\n")
    assert load_config(path).GenerateCamParams.max_fovy_range == [0.3, 0.5]


@pytest.mark.parametrize("content", [b"", b"\n\n", b"# only comments\n# here\n", b"---\n", b"null\n"])
def test_an_empty_config_file_is_refused(tmp_path, content):
    with pytest.raises(ConfigError, match="is empty \\(no sections\\).*leave out --opt"):
        load_config(write_bytes(tmp_path, "empty.yaml", content))


def test_an_explicit_empty_mapping_is_all_defaults(tmp_path):
    assert load_config(write_bytes(tmp_path, "cfg.yaml", b"{}\n")) == Config()


@pytest.mark.parametrize("name, content, expected", [
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", "is a PNG image, not a YAML config"),
    ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF", "is a JPEG image"),
    ("weights.bin", bytes(range(256)), "is a binary file \\(not UTF-8 text\\)"),
    ("nul.yaml", b"seed: 1\n\x00\x00", "is a binary file"),
])
def test_a_binary_config_file_is_refused(tmp_path, name, content, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write_bytes(tmp_path, name, content))


def test_a_folder_passed_as_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file with --opt$"):
        load_config(tmp_path)
    save_config(Config(), tmp_path / "config.yaml")  # a run folder: point at its saved config
    with pytest.raises(ConfigError, match="is a folder; .*config.yaml \\(the run's saved config\\)"):
        load_config(tmp_path)


@pytest.mark.parametrize("name, content", [("image.png", b"\x89PNG\r\n\x1a\n\x00"), ("empty.yaml", b""),
                                           ("twice.yaml", b"seed: 1\nseed: 2\n"), ("folder", None)])
def test_bad_config_file_through_the_cli_exits_2_with_one_line(tmp_path, name, content):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    code = "import argparse, sys; from arguments import parse_cli; parse_cli(sys.argv[1:], argparse.ArgumentParser())"
    out = subprocess.run([sys.executable, "-c", code, "--opt", str(path)], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: config file '{path}"), out.stderr


def test_booleans_switch_both_ways():
    assert load_config(None, ["ModelParams.white_background=false"]).ModelParams.white_background is False
    cfg = load_config(None, ["GuidanceParams.fp16=false", "GuidanceParams.fp16=true"])
    assert cfg.GuidanceParams.fp16 is True


def test_stock_luciddreamer_config_loads_with_warnings(tmp_path):
    # keys of LucidDreamer's own configs/bagel.yaml, including ones this project does not use
    path = write(tmp_path, """
        port: 2355
        save_video: true
        seed: 0
        PipelineParams:
          convert_SHs_python: False
        ModelParams:
          workspace: bagel
          bg_aug_ratio: 0.66
        GuidanceParams:
          model_key: 'stabilityai/stable-diffusion-2-1-base'
          text: 'a DSLR photo of a bagel filled with cream cheese and lox.'
          ddim_inv: true
          annealing_intervals: true
          perpneg: false
        GenerateCamParams:
          init_shape: 'pointe'
          use_pointe_rgb: false
          init_num_pts: 100_000
        OptimizationParams:
          save_process: True
          geo_iter: 0
          progressive_view_iter: 500
        """)
    with pytest.warns(UserWarning) as record:
        cfg = load_config(path)
    ignored = {str(w.message).split("'")[1] for w in record}
    assert ignored == {"port", "PipelineParams.convert_SHs_python", "GuidanceParams.ddim_inv",
                       "GenerateCamParams.use_pointe_rgb", "OptimizationParams.save_process",
                       "OptimizationParams.geo_iter", "OptimizationParams.progressive_view_iter"}
    assert cfg.ModelParams.bg_aug_ratio == 0.66 and cfg.GenerateCamParams.init_shape == "pointe"


@pytest.mark.parametrize("override", ["GuidanceParams.guidance_scale=.nan", "OptimizationParams.position_lr_init=.inf",
                                      "GuidanceParams.t_range=[0.02, -.inf]"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(None, [override])


def test_a_retired_key_of_an_older_run_loads_with_a_warning(tmp_path):
    path = write(tmp_path, """
        OptimizationParams:
          background_lr: 0.005
          iterations: 7
        """)
    with pytest.warns(UserWarning, match="retired key 'OptimizationParams.background_lr'"):
        assert load_config(path).OptimizationParams.iterations == 7
    with pytest.raises(ConfigError, match="unknown key 'OptimizationParams.background_l'"):
        load_config(None, ["OptimizationParams.background_l=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["GuidanceParams.text=a cat", "PTDParams.mode=weighted", "seed=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["PTDParams"]["mode"] == "weighted"


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_every_shipped_config_and_the_stock_defaults_pass_the_checks():
    from arguments.checks import check_config

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        check_config(load_config(path))
    check_config(load_config(None, ["GuidanceParams.text=a DSLR photo of a hamburger"]))  # stock LucidDreamer


@pytest.mark.parametrize("override, expected", [
    ("ModelParams.workspace=a/b", "has a path separator"),
    ("ModelParams.workspace=a\\b", "has a path separator"),
    ("ModelParams.workspace=.", "ModelParams.workspace '.' is not a folder name"),
    ("ModelParams.sh_degree=4", "ModelParams.sh_degree must be 0, 1, 2 or 3"),
    ("GuidanceParams.t_range=[0.1]", "GuidanceParams needs 0 <= t_range"),
    ("GenerateCamParams.phi_range=[1, 2, 3]", "GenerateCamParams.phi_range must be two numbers"),
    ("OptimizationParams.fovy_scale_up_factor=[1]", "OptimizationParams.fovy_scale_up_factor must be two numbers"),
    ("GenerateCamParams.radius_range=[5.5, 5.5]", "GenerateCamParams.radius_range must be \\[min, max\\]"),
    ("GenerateCamParams.fovy_range=[0.3, 3.2]", "0 < min < max < 3.142 radians"),
    ("GenerateCamParams.default_radius=0", "GenerateCamParams.default_radius must be > 0"),
    ("GenerateCamParams.init_num_pts=0", "GenerateCamParams.init_num_pts must be >= 1"),
    ("GenerateCamParams.image_w=8196", "image_w must be a positive multiple of 8 .*got 8196"),
    ("GenerateCamParams.image_h=8208", "above the limit of 8192 pixels a side"),
    ("EvalParams.clip_resolution=9000", "EvalParams.clip_resolution must be at most 8192"),
    ("OptimizationParams.video_fps=0", "OptimizationParams.video_fps must be >= 1"),
    ("OptimizationParams.checkpoint_interval=-1", "OptimizationParams.checkpoint_interval must be >= 0"),
    ("PTDParams.checkpoint_interval=-1", "PTDParams.checkpoint_interval must be >= 0"),
    ("PTDParams.power=-0.3", "PTDParams.power must be > 0"),
    ("seed=4294967296", "seed must be in \\[0, 2\\^32 - 1\\]"),
    ("device=meta", "device 'meta' is not a device this project runs on"),
    ("device=cuda:x", "device 'cuda:x' is not a device"),
])
def test_range_checks_name_the_key(override, expected):
    from arguments.checks import check_config

    with pytest.raises(ConfigError, match=expected) as err:
        check_config(load_config(ROOT / "configs" / "smoke.yaml", [override]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["device=cuda:1", "device=cpu", "seed=4294967295", "GuidanceParams.delta_t=0",
                                      "OptimizationParams.scale_up_cameras_iter=0", "ModelParams.bg_aug_ratio=1",
                                      "OptimizationParams.as_latent_ratio=0", "ModelParams.workspace=run #2"])
def test_range_check_boundaries_pass(override):
    from arguments.checks import check_config

    check_config(load_config(ROOT / "configs" / "smoke.yaml", [override]))  # CUDA's presence is checked at run time


def test_cli_exits_nonzero_with_one_line(tmp_path):
    path = write(tmp_path, "GuidanceParams:\n  guidance_scal: 5\n")
    code = ("import argparse, sys; from arguments import parse_cli; "
            "parse_cli(sys.argv[1:], argparse.ArgumentParser())")
    for argv in (["--opt", str(path)], ["GuidanceParams.lambda_guidanc=1"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "did you mean" in lines[0], out.stderr


def test_yaml12_scalars_off_is_a_string_and_1e4_a_number(tmp_path):
    path = write(tmp_path, """
        PTDParams:
          mode: off
          lora_lr: 1e-4
        ModelParams:
          white_background: false
        """)
    cfg = load_config(path, ["GuidanceParams.lambda_guidance=5e-2"])
    assert cfg.PTDParams.mode == "off" and cfg.PTDParams.lora_lr == 1e-4
    assert cfg.ModelParams.white_background is False and cfg.GuidanceParams.lambda_guidance == 0.05
    assert load_config(None, ["PTDParams.mode=off"]).PTDParams.mode == "off"
