"""Train the toy CLIP: `python -m toyworld.train_clip [--resume]`.

An open_clip-format model (a small ViT on 64 px images and a small text transformer on open_clip's own tokenizer),
trained contrastively on the toy world's renders (toyworld.data, the same images as the toy prior) and their plain
or view-dependent captions. From step `--domain-from` on, part of each batch is put through the toy prior's own
autoencoder (encode, decode: its blur and colour shifts) and part gets blotchy, noisy backgrounds, so that the CLIP
also names what the prior and the distilled models produce, not only clean renders. Written as `ptd-toy-clip.json`
(the config) and `ptd-toy-clip.safetensors`, so that `evaluate.py --clip-models toy` runs the paper's CLIP protocol
with a scorer that knows this world.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.clip import TOY_CLIP_DIR, TOY_CLIP_NAME
from guidance.sd_utils import TOY_PRIOR_DIR
from toyworld.data import cached_dataset, composite
from toyworld.train_prior import changed_settings, compact_log, expand_log, warmup_decay_lr
from utils.files import atomic_folder, atomic_path

REPO = Path(__file__).resolve().parent
DEFAULT_OUT = TOY_CLIP_DIR  # where evaluation.clip loads --clip-models toy from
TOY_CLIP_CONFIG = {"embed_dim": 64,
                   "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
NOT_SETTINGS = ("resume", "work", "out", "threads", "prior")
LATER_SETTINGS = {"init": "", "decay_from": 0}  # settings added after checkpoints were written, as those had them


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> open_clip's input (OpenAI mean/std), as its eval transform does."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean = torch.tensor(OPENAI_DATASET_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[None, :, None, None]
    return (images - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random zoom (crop 80-100% and resize back) and, for a third, a blur: distilled models and prior samples are
    softer and framed differently than the clean renders."""
    b, _, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(b):
        s = float(0.8 + 0.2 * torch.rand(1, generator=gen))
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = images[i:i + 1, :, y:y + ch, x:x + cw]
        out[i:i + 1] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    blur = torch.rand(b, generator=gen) < 1 / 3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        out[blur] = F.conv2d(F.pad(out[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return out


def load_autoencoder(prior: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(prior), subfolder="vae").eval().requires_grad_(False)


@torch.no_grad()
def autoencoder_round_trip(images: torch.Tensor, pick: torch.Tensor, vae) -> torch.Tensor:
    """`images` [B, 3, H, W] in [0, 1] with the rows `pick` replaced by decode(mean of encode(.)) through `vae`."""
    if not pick.any():
        return images
    x = images[pick].to(vae.dtype) * 2 - 1
    out = images.clone()
    out[pick] = ((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).to(images.dtype)
    return out


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor):
    """CLIP's symmetric loss with repeated captions: image i's positive is its caption (row targets[i] of the
    unique captions); caption j's positives are all images with that caption, equally weighted."""
    logits = logit_scale.exp() * img @ txt.T  # [B, U]
    loss_i = F.cross_entropy(logits, targets)
    pos = F.one_hot(targets, txt.shape[0]).float().T  # [U, B]
    loss_t = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def register(folder: Path) -> str:
    """Register the toy config with open_clip (from `folder`/ptd-toy-clip.json, written if missing); its name."""
    import open_clip

    path = Path(folder) / f"{TOY_CLIP_NAME}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(TOY_CLIP_CONFIG, indent=1))
    if TOY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(path)
    return TOY_CLIP_NAME


def build_model(seed: int, work: Path):
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**TOY_CLIP_CONFIG)
    return model, open_clip.get_tokenizer(register(work))  # open_clip's BPE at the config's context length


def load_init(model, folder: Path) -> list[dict]:
    """Load a written toy CLIP's weights (fp16 on disk) into `model` (fp32); its training log, which the new
    training's log goes on from."""
    from safetensors.torch import load_file

    weights = Path(folder) / f"{TOY_CLIP_NAME}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--init {folder}: no {weights.name} there; pass a folder train_clip wrote")
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    log = Path(folder) / "training_log.json"
    return [{**r, "phase": "clip"} for r in expand_log(json.loads(log.read_text()))] if log.is_file() else []


def training_args(settings: dict) -> dict:
    """What a written CLIP records of its making: the settings, and with --init the init folder's own record
    (None where that folder has none: the CLIPs written before 2026-12-01)."""
    out = dict(settings)
    if settings.get("init"):
        rec = Path(settings["init"]) / "training_args.json"
        out["init_args"] = json.loads(rec.read_text()) if rec.is_file() else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", default=str(REPO.parent / ".toyworld-work"), help="rendered images and checkpoints")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", type=int, default=250, help="rendered views per object (as the toy prior)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--decay-from", type=int, default=0,
                   help="step from which the learning rate falls linearly to zero at --steps (0: constant)")
    p.add_argument("--init", default="", help="start from the weights of this toy CLIP folder (fine-tuning; "
                   "--steps then counts the new steps, and its training log goes on from the folder's)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--domain-from", type=int, default=1000, help="step from which the two augmentations below run")
    p.add_argument("--vae-frac", type=float, default=0.5, help="fraction of a batch round-tripped through the "
                   "prior's autoencoder")
    p.add_argument("--textured", type=float, default=0.3, help="fraction of backgrounds made blotchy and noisy")
    p.add_argument("--prior", default=str(TOY_PRIOR_DIR), help="the toy prior whose autoencoder is used")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 <= args.decay_from < args.steps:
        print(f"error: --decay-from {args.decay_from} must lie in [0, --steps {args.steps})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = cached_dataset(work, args.views, 64, args.seed)
    model, tokenizer = build_model(args.seed, work)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed + 11)
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    ckpt, step, log = work / "clip_checkpoint.pt", 0, []
    if args.init and not ckpt.is_file():
        try:
            log = load_init(model, Path(args.init))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if ckpt.is_file():
        if not args.resume:
            print(f"error: {ckpt} exists; pass --resume to continue it, or delete it to start over", file=sys.stderr)
            return 2
        s = torch.load(ckpt, weights_only=True)
        if changed_settings(json.loads(s["settings"]), settings, LATER_SETTINGS):
            print(f"error: {ckpt} was made with other settings; rerun with the same arguments", file=sys.stderr)
            return 2
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        gen.set_state(s["gen"])
        step, log = int(s["step"]), json.loads(s["log"])
    base = log[-1]["step"] - step if log else 0  # an --init's steps: the log's step numbers go on from them
    t0, vae = time.time() - (log[-1]["seconds"] if log else 0.0), None  # the log's seconds go on across resumes
    with tqdm(total=args.steps, initial=step, desc="toy CLIP", unit="step") as bar:
        while step < args.steps:
            idx = torch.randint(0, len(data), (args.batch,), generator=gen)
            domain = step >= args.domain_from
            rgba = torch.from_numpy(data.rgba[idx.numpy()])
            images = augment(composite(rgba, gen, textured=args.textured if domain else 0.0), gen)
            if domain and args.vae_frac > 0:
                vae = vae or load_autoencoder(Path(args.prior))
                images = autoencoder_round_trip(images, torch.rand(args.batch, generator=gen) < args.vae_frac, vae)
            plain = torch.rand(args.batch, generator=gen) < 0.5
            captions = [data.caption(int(i), plain=bool(q)) for i, q in zip(idx, plain)]
            unique = sorted(set(captions))
            targets = torch.tensor([unique.index(c) for c in captions])
            img = F.normalize(model.encode_image(normalise(images)), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(unique)), dim=-1)
            loss = contrastive_loss(img, txt, targets, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = warmup_decay_lr(step, args.lr, args.steps, args.decay_from)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            step += 1
            log.append({"phase": "clip", "step": base + step, "loss": loss.item(), "seconds": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
            if step % args.checkpoint_every == 0 or step == args.steps:
                with atomic_path(ckpt) as tmp:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                                "step": step, "log": json.dumps(log), "settings": json.dumps(settings)}, tmp)
    from safetensors.torch import save_file

    with atomic_folder(Path(args.out)) as tmp:
        (Path(tmp) / f"{TOY_CLIP_NAME}.json").write_text(json.dumps(TOY_CLIP_CONFIG, indent=1))
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp) / f"{TOY_CLIP_NAME}.safetensors"))
        (Path(tmp) / "training_log.json").write_text(json.dumps(compact_log(log)))
        (Path(tmp) / "training_args.json").write_text(json.dumps(training_args(settings), indent=1))
    print(f"toy CLIP written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
