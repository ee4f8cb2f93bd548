"""Stage-2 cost at the paper's scale without the weights (a benchmark, not a test; needs CUDA).

Stable Diffusion 2.1-base's architecture is built from its config numbers with random weights (nothing is
downloaded): UNet2DConditionModel (320, 640, 1280, 1280) channels, attention head dims (5, 10, 20, 20), cross-attention
1024, linear projections, 64x64 latents (865.9 M parameters); AutoencoderKL (128, 256, 512, 512); the OpenCLIP ViT-H
text tower as a CLIPTextModel (hidden 1024, 23 layers, 16 heads, MLP 4096) with the full 49,408-token CLIP BPE; the
PNDM scheduler config of the release. It is saved once as a normal diffusers folder (fp16 safetensors, ~2.6 GB) and
`GuidanceParams.model_key` points at it, so the guidance loads it with the same `from_pretrained(path)` as the real
weights. Random weights give the same cost as trained ones (the same ops on the same shapes).

Then on configs/paper.yaml (512 px, 4 views per iteration, fp16, 100k initial Gaussians, gsplat if installed, else
the torch rasteriser): a short stage 1 (form_path.main, its steps timed) writes the path LoRA; then the vanilla ISM arm
and the PTD arm run one after the other (only one pipeline in memory, so each arm's absolute peak is its own), each
with warm-up, train.py's `train_step`, per-iteration time and torch.cuda.max_memory_allocated. PTD's T is set so that
the timed iterations are half at w > 0 and half at w = 0 (after T, where the adapter is parked).

    python bench/gpu_scale.py [--iterations 20] [--warmup 3] [--rounds 2] [--model-dir DIR] [Section.key=value ...]
    python bench/gpu_scale.py --cpu-dry-run     # the same code path on the CPU at 64 px (fp32), to show it runs
On a machine without CUDA (and without --cpu-dry-run) it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch a model hub
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

# bumped when the architecture or the build changes, so an old folder is never reused
SD21_ARCH_VERSION = 1

# stabilityai/stable-diffusion-2-1-base unet/config.json (diffusers names)
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, upcast_attention=False)
# vae/config.json
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=768, scaling_factor=0.18215)
# text_encoder/config.json (OpenCLIP ViT-H/14 text tower, penultimate layer: 23 of its 24 layers)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, projection_dim=512, hidden_act="gelu", layer_norm_eps=1e-5)
# scheduler/scheduler_config.json (clip_sample is a DDIM key the release carries; PNDM ignores it)
SD21_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                      prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------- the model folder
def build_sd21_pipeline(device: torch.device | str = "cpu", seed: int = 0):
    """SD 2.1-base's architecture with random weights (fixed seed), as a StableDiffusionPipeline in fp32."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from guidance.tiny import _clip_bpe_merges, build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tok_dir:  # the whole CLIP BPE: 49,408 tokens, as SD 2.1's tokenizer
        tokenizer = build_tiny_tokenizer(Path(tok_dir), num_merges=len(_clip_bpe_merges()))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(**SD21_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **SD21_TEXT))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD21_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def default_model_dir() -> Path:
    root = Path(os.environ.get("PTD_TINY_CACHE", Path.home() / ".cache" / "ptd"))
    return root / f"sd21-base-architecture-random-v{SD21_ARCH_VERSION}"


def sd21_model_dir(folder: Path | None = None, device: torch.device | str = "cpu") -> Path:
    """The saved folder (built and saved in fp16 on first use; ~2.6 GB)."""
    folder = Path(folder) if folder is not None else default_model_dir()
    if (folder / "model_index.json").is_file():
        return folder
    from utils.files import atomic_folder

    t0 = time.perf_counter()
    with atomic_folder(folder, keep_existing=True) as tmp:
        pipe = build_sd21_pipeline(device)
        pipe.to(dtype=torch.float16).save_pretrained(tmp, safe_serialization=True)
        del pipe
    print(f"built SD 2.1-base architecture (random weights) into {folder} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return folder


def meta_unet_and_vae():
    """The UNet and VAE on the meta device (no memory, no compute): for FLOP counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def lora_flops(batch: int, latent: int) -> tuple[int, int, int]:
    """(UNet forward FLOPs, the same with the rank-4 path LoRA, fwd+bwd FLOPs of one LoRA training step) at
    batch x 4 x latent x latent on the meta device."""
    from guidance.lora_training import add_path_lora

    unet, _ = meta_unet_and_vae()
    x = torch.zeros(batch, 4, latent, latent, device="meta")
    emb = torch.zeros(batch, 77, SD21_UNET["cross_attention_dim"], device="meta")
    t = torch.full((batch,), 500, device="meta")
    with torch.no_grad():
        base = count_flops(lambda: unet(x, t, encoder_hidden_states=emb))
    with torch.device("meta"):
        add_path_lora(unet)
    with torch.no_grad():
        with_lora = count_flops(lambda: unet(x, t, encoder_hidden_states=emb))
    train = count_flops(lambda: unet(x, t, encoder_hidden_states=emb).sample.pow(2).mean().backward())
    return base, with_lora, train


def set_scale_cost(repeats: int = 2000) -> tuple[float, int]:
    """Median seconds of guidance.lora_merge.set_scale (what the tracer calls) on SD 2.1-base's UNet with the path
    LoRA (meta device: the call touches only Python attributes), and the number of LoRA layers."""
    from guidance.lora_merge import set_scale
    from guidance.lora_training import add_path_lora

    unet, _ = meta_unet_and_vae()
    with torch.device("meta"):
        add_path_lora(unet, adapter_name="ptd_path")
    set_scale(unet, 1.0, "ptd_path")  # the first call gathers the layers
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        set_scale(unet, 0.5 + 1e-4 * i, "ptd_path")
        times.append(time.perf_counter() - t0)
    layers = sum("ptd_path" in m.scaling for m in unet.modules() if isinstance(getattr(m, "scaling", None), dict))
    return statistics.median(times), layers


# ---------------------------------------------------------------------------------------------- the run
def make_configs(args, model_dir: Path, output_root: str):
    from ptd_overhead import make_configs as both_arms

    size = 64 if args.cpu_dry_run else args.size
    overrides = [f"GuidanceParams.model_key={model_dir}", f"GenerateCamParams.image_w={size}",
                 f"GenerateCamParams.image_h={size}", f"GuidanceParams.C_batch_size={args.batch}",
                 f"PTDParams.num_views={args.num_views}", f"PTDParams.total_steps={args.warmup + args.iterations // 2}",
                 "PTDParams.checkpoint_interval=0", "ModelParams.workspace=gpu_scale"]
    if args.cpu_dry_run:
        overrides += ["device=cpu", "GuidanceParams.fp16=false", "PipelineParams.backend=torch",
                      "GenerateCamParams.init_num_pts=2000"]
    else:
        import importlib.util
        backend = "gsplat" if importlib.util.find_spec("gsplat") is not None else "torch"
        overrides += ["device=cuda", f"PipelineParams.backend={backend}"]
    return both_arms(args.opt, overrides + list(args.overrides), output_root, args.path_epochs)


def run_arm(name: str, cfg, device: torch.device, iterations: int, warmup: int) -> dict:
    """One arm alone in memory: setup, warm-up, timed iterations; absolute and per-iteration peaks."""
    from ptd_overhead import Arm, memory_probe, sync

    if device.type == "cuda":  # gpu-only
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    arm = Arm(name, cfg, device)
    setup_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for it in range(1, warmup + iterations + 1):
        probe = memory_probe(device) if device.type == "cuda" else contextlib.nullcontext()
        arm.step(it, memory=probe)
        if device.type == "cuda":
            arm.peaks.append(probe.peak)
    sync(device)
    out = {"name": name, "setup_s": setup_s, "times": arm.times[warmup:], "weights": arm.weights[warmup:],
           "points": arm.points[-1], "model_bytes": weights,
           "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "iter_peaks": arm.peaks[warmup:], "skipped": arm.skipped}
    del arm
    gc.collect()
    return out


def print_table(results: list[dict], device: torch.device) -> None:
    gib = 2 ** 30
    print(f"\n{'arm':22} {'iters':>5} {'median s':>9} {'IQR s':>15} {'peak GiB':>9} {'iter +GiB':>9} {'points':>7}")
    for r in results:
        for label, keep in (("all", None), ("w>0", True), ("w=0", False)):
            times = [t for t, w in zip(r["times"], r["weights"]) if keep is None or (w > 0) == keep]
            if not times or (keep is not None and r["name"] == "vanilla"):
                continue
            s = sorted(times)
            iqr = f"{s[len(s) // 4]:.3f}-{s[(3 * len(s)) // 4]:.3f}"
            peak = f"{r['peak_bytes'] / gib:9.2f}" if r["peak_bytes"] is not None else f"{'-':>9}"
            it_peak = f"{max(r['iter_peaks']) / gib:9.2f}" if r["iter_peaks"] else f"{'-':>9}"
            print(f"{r['name'] + ' ' + label:22} {len(times):5d} {statistics.median(times):9.3f} {iqr:>15} {peak} "
                  f"{it_peak} {r['points']:7d}")
    if device.type != "cuda":
        print("(CPU: no allocator statistics; see bench/ptd_overhead.py for live-tensor peaks)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", default=str(ROOT / "configs" / "paper.yaml"))
    ap.add_argument("--size", type=int, default=512, help="render size in pixels (CUDA run)")
    ap.add_argument("--batch", type=int, default=4, help="views per iteration (C_batch_size)")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations per arm and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="vanilla, PTD, vanilla, PTD, ... (drift check)")
    ap.add_argument("--num-views", type=int, default=8, help="stage-1 renders (paper: 100; only its per-step cost "
                    "matters here)")
    ap.add_argument("--path-epochs", type=int, default=2, help="stage-1 epochs (timed per step)")
    ap.add_argument("--model-dir", default=None, help="where the random-weight SD 2.1-base folder is built/reused")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the same code path on the CPU at 64 px")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="Section.key=value config overrides")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("skipped: needs CUDA (SD 2.1-base scale at 512 px, fp16); --cpu-dry-run runs the same path at 64 px")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_dry_run:
        args.iterations, args.warmup, args.rounds = min(args.iterations, 2), min(args.warmup, 1), 1
        args.num_views, args.path_epochs = min(args.num_views, 4), min(args.path_epochs, 1)
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")  # gpu-only: this benchmark exists to measure CUDA
    model_dir = sd21_model_dir(args.model_dir, device="cpu" if args.cpu_dry_run else "cuda")  # gpu-only
    base, with_lora, train_step_flops = lora_flops(args.batch, (64 if args.cpu_dry_run else args.size) // 8)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, model {model_dir.name}")
    print(f"UNet forward at batch {args.batch}: {base / 1e9:.1f} GFLOP; with the rank-4 path LoRA "
          f"+{100 * (with_lora - base) / base:.2f}%; LoRA training step (fwd+bwd) {train_step_flops / 1e9:.1f} GFLOP")
    cost, layers = set_scale_cost()
    print(f"set_scale on the {layers} LoRA layers of the SD 2.1-base UNet: {cost * 1e3:.3f} ms per call (CPU)")
    with tempfile.TemporaryDirectory(prefix="gpu_scale_") as tmp:
        vanilla_cfg, ptd_cfg = make_configs(args, model_dir, tmp)
        from ptd_overhead import form_path_lora, sync
        sync(device)
        if device.type == "cuda":  # gpu-only
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        form_path_lora(ptd_cfg)
        sync(device)
        stage1 = time.perf_counter() - t0
        steps = args.path_epochs * -(-args.num_views // ptd_cfg.PTDParams.lora_batch_size)
        peak = (f", peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB allocated"
                if device.type == "cuda" else "")
        print(f"stage 1 (setup + {args.num_views} renders + encode + {steps} LoRA steps + loss report): "
              f"{stage1:.1f} s{peak}")
        gc.collect()
        results = []
        for _ in range(args.rounds):
            for name, cfg in (("vanilla", vanilla_cfg), ("PTD", ptd_cfg)):
                results.append(run_arm(name, cfg, device, args.iterations, args.warmup))
                print(f"  {name}: median {statistics.median(results[-1]['times']):.3f} s/iteration", file=sys.stderr)
        print_table(results, device)
    skipped = sum(r["skipped"] for r in results)
    print(f"non-finite iterations (skipped by the NaN guard): {skipped} of "
          f"{len(results) * (args.warmup + args.iterations)}")
    van = [t for r in results if r["name"] == "vanilla" for t in r["times"]]
    ptd = [t for r in results if r["name"] == "PTD" for t in r["times"]]
    where = "CPU dry run at 64 px: shows the path runs, measures nothing" if args.cpu_dry_run else f"{args.size} px"
    print(f"ptd/vanilla per-iteration time ratio ({where}): {statistics.median(ptd) / statistics.median(van):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
