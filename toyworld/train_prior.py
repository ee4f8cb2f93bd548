"""Train the toy prior from scratch: `python -m toyworld.train_prior [--resume]`.

A normal diffusers StableDiffusionPipeline folder (AutoencoderKL 64 px -> 16x16x4, UNet2DConditionModel, a small
CLIPTextModel trained jointly with the UNet, SD 2.1-base's DDIM schedule), trained on the toy world's renders
(toyworld.data) with their view-dependent captions, 15% empty captions (the unconditional branch of CFG) and EMA
weights. Three phases (autoencoder; UNet + text encoder; --decoder-steps, 0 to skip: the decoder learns to
decode noisy latents, the encoder frozen), each checkpointed every --checkpoint-every steps in --work; `--resume`
continues where an interrupted run stopped, with the same result as an uninterrupted one at the same thread count.
`--resume` with more UNet steps, a later learning-rate decay or an added decoder phase (or a longer UNet phase and a
decoder phase at once, as a checkpoint of the old 7,000-step defaults gets from a plain `--resume` now) goes on from
a finished run as if asked for from the start.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guidance.sd_utils import TOY_PRIOR_DIR
from guidance.tiny import build_tiny_tokenizer
from toyworld.data import broad_composite, cached_dataset
from utils.files import atomic_folder, atomic_path

REPO = Path(__file__).resolve().parent
DEFAULT_OUT = TOY_PRIOR_DIR  # where model_key: toy resolves
EMPTY_CAPTION = 0.15
NOT_SETTINGS = ("resume", "work", "out", "threads", "export_only", "stop_after")
# settings added after checkpoints were written, with the value those had
LATER_SETTINGS = {"vae_broad": 0.0, "unet_decay_from": 0, "decoder_steps": 0, "decoder_noise": 0.6, "decoder_lr": 1e-4}
DECODER_SETTINGS = ("decoder_steps", "decoder_noise", "decoder_lr")


class Paused(Exception):
    """--stop-after reached: the checkpoint is saved, `--resume` continues."""  # arguments a resumed run may change


def build_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                        block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16, scaling_factor=1.0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4, 8), use_linear_projection=True, norm_num_groups=32)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return vae, unet, CLIPTextModel(text_config)


def sd21_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type="epsilon")


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def ema_decay(step: int, target: float = 0.999) -> float:
    """Warm-started EMA: short memory early, `target` later."""
    return min(target, (1.0 + step) / (10.0 + step))


def warmup_decay_lr(step: int, lr: float, total: int, decay_from: int = 0) -> float:
    """The learning rate at 0-based `step` (the UNet's here, the toy CLIP's too): linear warm-up over 100 steps, then
    constant; with `decay_from` > 0, linear decay from that step to zero at `total`."""
    rate = lr * min(1.0, (step + 1) / 100)
    if 0 < decay_from <= step:
        rate *= (total - step) / (total - decay_from)
    return rate


def changed_settings(saved: dict, now: dict, later: dict) -> set[str]:
    """The settings in `now` that differ from a checkpoint's `saved` ones; a setting the checkpoint predates counts as
    the value in `later` (what runs before it existed did)."""
    return {k for k in now if saved.get(k, later.get(k)) != now[k]}


def extends_unet(saved: dict, now: dict, phase: str, step: int) -> bool:
    """Whether settings `now` only lengthen the UNet phase of a checkpoint made with `saved` (at `phase`, `step`)
    without changing the learning rate of any step already done: more steps, and a decay that starts at or after
    `step` (or none). Checkpoints from before --unet-decay-from had none."""
    diff = changed_settings(saved, now, LATER_SETTINGS)
    if phase not in ("unet", "done") or not diff <= {"unet_steps", "unet_decay_from"}:
        return False
    if phase == "done" and saved.get("decoder_steps", LATER_SETTINGS["decoder_steps"]):
        return False  # the decoder phase ran after the UNet's: more UNet steps now would come in another order
    old_decay = saved.get("unet_decay_from", LATER_SETTINGS["unet_decay_from"])
    if now["unet_steps"] < saved["unet_steps"] or (phase == "done" and now["unet_steps"] == saved["unet_steps"]):
        return False
    if old_decay and old_decay <= step:
        return False  # the saved run was already decaying: another length would change done steps' rates
    return now["unet_decay_from"] == 0 or now["unet_decay_from"] >= step


def extends_decoder(saved: dict, now: dict, phase: str) -> bool:
    """Whether settings `now` only add or lengthen the decoder phase of a checkpoint made with `saved` (at `phase`):
    any decoder settings before that phase has begun (a finished run without one starts it), afterwards only more
    steps at the same noise and learning rate (both constant)."""
    diff = changed_settings(saved, now, LATER_SETTINGS)
    if not diff <= set(DECODER_SETTINGS):
        return False
    old = saved.get("decoder_steps", LATER_SETTINGS["decoder_steps"])
    if phase in ("vae", "unet") or (phase == "done" and old == 0):
        return True
    return diff == {"decoder_steps"} and now["decoder_steps"] > old


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


class Trainer:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        tok_dir = self.work / "tokenizer"
        self.tokenizer = build_tiny_tokenizer(tok_dir)
        self.vae, self.unet, self.text_encoder = build_models(self.tokenizer, args.seed)
        self._data = None
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        self.scheduler = sd21_scheduler()
        self.abar = self.scheduler.alphas_cumprod.float()
        self.phase, self.step, self.log = "vae", 0, []
        self.steps_this_run = 0
        self.scaling = 1.0
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.unet_params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.unet_opt = torch.optim.AdamW(self.unet_params, lr=args.unet_lr, weight_decay=0.01)
        self.ema_unet, self.ema_text = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        self.decoder_params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        self.decoder_opt = torch.optim.AdamW(self.decoder_params, lr=args.decoder_lr, weight_decay=0.0)
        self.ckpt = self.work / "checkpoint.pt"

    @property
    def data(self):
        if self._data is None:
            self._data = cached_dataset(self.work, self.args.views, 64, self.args.seed)
        return self._data

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"phase": self.phase, "step": self.step, "log": json.dumps(self.log), "scaling": self.scaling,
                "vae": self.vae.state_dict(), "unet": self.unet.state_dict(), "text": self.text_encoder.state_dict(),
                "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict(),
                "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
                "decoder_opt": self.decoder_opt.state_dict(),
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "args": json.dumps(self.settings())}

    def settings(self) -> dict:
        """The arguments that shape the result (not where files go, nor the thread count)."""
        return {k: v for k, v in vars(self.args).items() if k not in NOT_SETTINGS}

    def save(self) -> None:
        with atomic_path(self.ckpt) as tmp:
            torch.save(self.state(), tmp)

    def load(self) -> None:
        s = torch.load(self.ckpt, weights_only=True)
        saved_args = json.loads(s["args"])
        now = self.settings()
        diff = sorted(changed_settings(saved_args, now, LATER_SETTINGS))
        # the UNet's part of the new settings, with the checkpoint's decoder settings: extending the UNet may come
        # with any decoder phase, which then runs after the UNet's steps as in a run asked for so from the start
        unet_part = {**now, **{k: saved_args.get(k, LATER_SETTINGS[k]) for k in DECODER_SETTINGS}}
        if diff and extends_unet(saved_args, unet_part, s["phase"], s["step"]):
            # more UNet steps, the decay (if any) starting at or after the saved step: the learning rate of the steps
            # done is unchanged, so going on equals having asked for the new schedule from the start
            s["phase"] = "unet"
        elif diff and extends_decoder(saved_args, now, s["phase"]):
            if s["phase"] == "done":  # a finished run gets (more) decoder steps
                old = saved_args.get("decoder_steps", LATER_SETTINGS["decoder_steps"])
                s["phase"], s["step"] = "decoder", s["step"] if old else 0
        elif diff:
            raise ValueError(f"checkpoint {self.ckpt} was made with other settings ({', '.join(diff)}); rerun with "
                             "the same arguments, or remove it to start over")
        self.phase, self.step, self.log, self.scaling = s["phase"], s["step"], json.loads(s["log"]), s["scaling"]
        self.vae.load_state_dict(s["vae"])
        self.unet.load_state_dict(s["unet"])
        self.text_encoder.load_state_dict(s["text"])
        self.ema_unet.load_state_dict(s["ema_unet"])
        self.ema_text.load_state_dict(s["ema_text"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.unet_opt.load_state_dict(s["unet_opt"])
        if "decoder_opt" in s:  # checkpoints from before the decoder phase have none
            self.decoder_opt.load_state_dict(s["decoder_opt"])
        self.gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])

    def batch(self, n: int, broad: float = 0.0) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self.data), (n,), generator=self.gen)
        images = broad_composite(torch.from_numpy(self.data.rgba[idx.numpy()]), self.gen, broad)  # 0: composite()
        plain = torch.rand(n, generator=self.gen) < 0.25  # the plain prompt sometimes (the CLIP/probe text)
        empty = torch.rand(n, generator=self.gen) < EMPTY_CAPTION
        captions = ["" if e else self.data.caption(int(i), plain=bool(p)) for i, p, e in zip(idx, plain, empty)]
        return images, captions

    # ------------------------------------------------------------------------------------------ phases
    def vae_step(self) -> float:
        images, _ = self.batch(self.args.vae_batch, broad=self.args.vae_broad)
        x = 2 * images - 1
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample(generator=self.gen)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + self.args.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return loss.item()

    @torch.no_grad()
    def measure_scaling(self) -> float:
        """SD's latent scaling: 1 / std of the posterior samples over the data."""
        images, _ = self.batch(256)
        z = self.vae.encode(2 * images - 1).latent_dist.sample(generator=self.gen)
        return float(1.0 / z.std())

    def unet_step(self) -> float:
        images, captions = self.batch(self.args.batch)
        with torch.no_grad():
            z0 = self.vae.encode(2 * images - 1).latent_dist.sample(generator=self.gen) * self.scaling
        t = torch.randint(0, 1000, (z0.shape[0],), generator=self.gen)
        noise = torch.randn(z0.shape, generator=self.gen)
        abar = self.abar[t][:, None, None, None]
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        emb = self.text_encoder(tokenize(self.tokenizer, captions))[0]
        pred = self.unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet_params, 1.0)
        for g in self.unet_opt.param_groups:
            g["lr"] = warmup_decay_lr(self.step, self.args.unet_lr, self.args.unet_steps, self.args.unet_decay_from)
        self.unet_opt.step()
        decay = ema_decay(self.step)
        ema_update(self.ema_unet, self.unet, decay)
        ema_update(self.ema_text, self.text_encoder, decay)
        return loss.item()

    def decoder_step(self) -> float:
        """The decoder (and post_quant_conv) learns to decode posterior samples plus Gaussian noise of up to
        --decoder-noise (in the UNet's scaled units) into the clean image; the encoder stays frozen, so the latents the
        UNet was trained on, and stage 1 and 2 see, do not change."""
        images, _ = self.batch(self.args.vae_batch, broad=self.args.vae_broad)
        x = 2 * images - 1
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample(generator=self.gen)
        sigma = torch.rand(z.shape[0], 1, 1, 1, generator=self.gen) * self.args.decoder_noise
        z = z + sigma / self.scaling * torch.randn(z.shape, generator=self.gen)
        rec = self.vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        self.decoder_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.decoder_opt.step()
        return loss.item()

    def run(self) -> None:
        a = self.args
        if self.phase == "vae":
            self.vae.train()
            self._loop(a.vae_steps, self.vae_step, "autoencoder")
            self.scaling = self.measure_scaling()
            self.phase, self.step = "unet", 0
            self.save()
        if self.phase == "unet":
            self.vae.eval().requires_grad_(False)
            self._loop(a.unet_steps, self.unet_step, "UNet + text encoder")
            self.phase, self.step = ("decoder", 0) if a.decoder_steps else ("done", self.step)
            self.save()
        if self.phase == "decoder":
            self.vae.eval().requires_grad_(False)
            for q in self.decoder_params:
                q.requires_grad_(True)
            self._loop(a.decoder_steps, self.decoder_step, "decoder")
            self.phase = "done"
            self.save()

    def _loop(self, total: int, step_fn, name: str) -> None:
        done = [r for r in self.log if r["phase"] == self.phase]
        t0 = time.time() - (done[-1]["seconds"] if done else 0.0)  # the log's seconds go on across resumes
        with tqdm(total=total, initial=self.step, desc=f"toy prior: {name}", unit="step") as bar:
            while self.step < total:
                loss = step_fn()
                self.step += 1
                self.log.append({"phase": self.phase, "step": self.step, "loss": loss,
                                 "seconds": time.time() - t0})
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update()
                self.steps_this_run += 1
                stop = self.args.stop_after and self.steps_this_run >= self.args.stop_after and self.step < total
                if self.step % self.args.checkpoint_every == 0 or self.step == total or stop:
                    self.save()
                if stop:
                    raise Paused()

    # ------------------------------------------------------------------------------------------ export
    def export(self, out: Path) -> None:
        from diffusers import StableDiffusionPipeline

        vae = copy.deepcopy(self.vae)
        vae.register_to_config(scaling_factor=self.scaling)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=self.ema_text, tokenizer=self.tokenizer,
                                       unet=self.ema_unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        with atomic_folder(out) as tmp:
            pipe.save_pretrained(tmp)
            half_precision(Path(tmp) / "unet" / "diffusion_pytorch_model.safetensors")
            self.tokenizer.save_pretrained(Path(tmp) / "tokenizer")
            for name in ("vocab.json", "merges.txt"):  # transformers 5 writes tokenizer.json only; 4.x needs these
                shutil.copy(self.work / "tokenizer" / name, Path(tmp) / "tokenizer" / name)
            (Path(tmp) / "training_log.json").write_text(json.dumps(compact_log(self.log)))
            (Path(tmp) / "training_args.json").write_text(json.dumps(self.settings(), indent=1))


def compact_log(log: list[dict]) -> dict:
    """The training log as committed: one column per field for each phase (``{phase: {"step": [...], "loss": [...],
    "seconds": [...]}}``), losses to 6 significant digits, seconds to 0.1 s: a third of the bytes of one JSON object
    per step, which keeps the committed weights under the 25 MB budget. `expand_log` reads it back."""
    out: dict[str, dict[str, list]] = {}
    for r in log:
        cols = out.setdefault(r["phase"], {"step": [], "loss": [], "seconds": []})
        cols["step"].append(r["step"])
        cols["loss"].append(float(f"{r['loss']:.6g}"))
        cols["seconds"].append(round(r["seconds"], 1))
    return out


def expand_log(data) -> list[dict]:
    """A committed training log (`compact_log`'s columns, or the list of per-step objects written before
    2026-12-01) as a list of {"phase", "step", "loss", "seconds"}."""
    if isinstance(data, list):
        return data
    return [{"phase": phase, "step": st, "loss": lo, "seconds": se}
            for phase, cols in data.items() for st, lo, se in zip(cols["step"], cols["loss"], cols["seconds"])]


def half_precision(path: Path) -> None:
    """Store a safetensors file's float32 tensors as float16, in place: the UNet's outputs move by ~2e-4 relative
    (measured at t = 50, 500, 950), and the committed folder halves. Loading with dtype float32 casts them back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v.half().contiguous() if v.dtype == torch.float32 else v for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="pipeline folder to write (replaced atomically)")
    p.add_argument("--work", default=str(REPO.parent / ".toyworld-work"),
                   help="rendered images and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--export-only", action="store_true",
                   help="write --out from the checkpoint in --work as it is now (e.g. while training goes on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", type=int, default=250, help="rendered views per object")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--vae-broad", type=float, default=0.5,
                   help="share of the autoencoder's images widened beyond the world (toyworld.data.broad_composite: "
                        "random colours, specks, noise), so that its encoder keeps colours it never saw")
    p.add_argument("--unet-steps", type=int, default=10000)
    p.add_argument("--unet-lr", type=float, default=4e-4)
    p.add_argument("--unet-decay-from", type=int, default=7000,
                   help="UNet step from which the learning rate falls linearly to zero at --unet-steps (0: constant)")
    p.add_argument("--decoder-steps", type=int, default=1000,
                   help="after the UNet: fine-tune the decoder on noisy latents, the encoder frozen (0: none)")
    p.add_argument("--decoder-noise", type=float, default=0.6,
                   help="largest std of the Gaussian noise added to the decoder's latents, in the UNet's units")
    p.add_argument("--decoder-lr", type=float, default=1e-4)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="save and stop after this many steps in this invocation (0: run to the end); --resume goes on")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.unet_decay_from < args.unet_steps:
        print(f"error: --unet-decay-from {args.unet_decay_from} must lie in [0, --unet-steps {args.unet_steps}); "
              "pass a smaller one, or 0 for a constant learning rate", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    torch.manual_seed(args.seed + 2)
    if args.export_only:
        if not trainer.ckpt.is_file():
            print(f"error: no checkpoint in {args.work} to export; train first", file=sys.stderr)
            return 2
        trainer.load()
        trainer.export(Path(args.out))
        print(f"toy prior (phase {trainer.phase}, step {trainer.step}) written to {args.out}")
        return 0
    if trainer.ckpt.is_file():
        if not args.resume:
            print(f"error: {trainer.ckpt} exists; pass --resume to continue it, or remove {args.work} to start over",
                  file=sys.stderr)
            return 2
        try:
            trainer.load()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"resumed: phase {trainer.phase}, step {trainer.step}")
    try:
        trainer.run()
    except Paused:
        print(f"stopped at phase {trainer.phase}, step {trainer.step}; rerun with --resume to continue")
        return 0
    trainer.export(Path(args.out))
    print(f"toy prior written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
