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
    assert (o.iterations, o.warmup_iter, o.densify_grad_threshold, o.opacity_reset_interval) == (5000, 1500, 0.00075, 300)
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
    ("GuidanceParams.text=[1]", "expected a string"),
])
def test_wrong_types_are_rejected(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


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
