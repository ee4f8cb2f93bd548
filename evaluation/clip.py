"""CLIP similarity of a 3D model by the paper's protocol (§6.1), shared by evaluate.py, the training monitor and batch.

Protocol: render the 16-view rig (`scene.eval_rig_cameras`: radius 4, elevations 0 and 45 degrees, 8 azimuths from
-180 in 45-degree steps, fovy 0.55), score each view as 100 x cosine(CLIP image, CLIP text of the prompt), average over
the views. The paper's scorers are OpenAI's ViT-L/14 (`ViT-L-14`, tag `openai`) and OpenCLIP's ViT-bigG-14
(`ViT-bigG-14`, tag `laion2b_s39b_b160k`), through open_clip. `pretrained` is a tag (downloaded by open_clip on a
machine with internet, then cached) or a local weights file; offline without weights, loading fails with one line
saying how to get them.

Model specs are `NAME:PRETRAINED` (open_clip name and pretrained tag or local weights file), comma-separated, or
`tiny`: an offline toy open_clip config (random weights, seeded) for tests and CPU demos, which measures nothing, or
`toy`: the small CLIP trained on the toy world's renders (toyworld/), which scores toy-world prompts meaningfully.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from gaussian_renderer import render_views
from guidance.tiny import default_cache_root
from scene import eval_rig_cameras
from utils.files import write_text_atomic

# the paper's two scorers: (open_clip model name, pretrained tag)
PAPER_MODELS = (("ViT-L-14", "openai"), ("ViT-bigG-14", "laion2b_s39b_b160k"))


@dataclass
class ClipScorer:
    """An open_clip model with its eval preprocessing and tokenizer."""
    name: str
    model: torch.nn.Module
    preprocess: object
    tokenizer: object

    @classmethod
    def load(cls, name: str, pretrained: str | None, device: torch.device | str = "cpu") -> "ClipScorer":
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None,
                                                                         device=device)
        except RuntimeError as err:
            if "download" in str(err).lower() or "offline" in str(err).lower():
                raise ValueError(
                    f"CLIP weights '{name}:{pretrained}' are not available offline; download them once on a machine "
                    f"with internet (open_clip caches them) or pass a local weights file as pretrained") from None
            raise
        model.eval()
        return cls(name=f"{name}:{pretrained}", model=model, preprocess=preprocess,
                   tokenizer=open_clip.get_tokenizer(name))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [V, 3, H, W] in [0, 1] -> unit-norm features [V, D], through the model's own eval transform."""
        from PIL import Image

        pil = [Image.fromarray((im.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))
               for im in images]
        batch = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
        feats = self.model.encode_image(batch).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def similarity(self, images: torch.Tensor, text: str) -> torch.Tensor:
        """Per-view CLIP similarity [V]: 100 x cosine(image_v, text)."""
        return 100.0 * (self.image_features(images) @ self.text_features([text]).T)[:, 0]


TINY_CLIP_NAME = "ptd-tiny-clip"
TINY_CLIP_CONFIG = {"embed_dim": 16,
                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
# seed of the tiny CLIP's random weights (the same toy scorer in every process)
TINY_CLIP_SEED = 0
# "toy": the CLIP trained on the toy world (`python -m toyworld.train_clip`): a config JSON and its weights
TOY_CLIP_NAME = "ptd-toy-clip"
TOY_CLIP_DIR = Path(__file__).resolve().parents[1] / "toyworld" / "weights" / "clip"


def register_toy_clip() -> tuple[str, str]:
    """Register the toy world's CLIP config with open_clip; (model name, weights file)."""
    import open_clip

    config, weights = TOY_CLIP_DIR / f"{TOY_CLIP_NAME}.json", TOY_CLIP_DIR / f"{TOY_CLIP_NAME}.safetensors"
    if not (config.is_file() and weights.is_file()):
        raise ValueError(f"CLIP model 'toy': {TOY_CLIP_DIR} lacks {config.name} or {weights.name}; train it with "
                         "`python -m toyworld.train_clip`")
    if TOY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config)
    return TOY_CLIP_NAME, str(weights)


def register_tiny_clip() -> str:
    """Register the toy config with open_clip (a JSON file in the tiny-model cache); returns its model name."""
    import open_clip

    path = default_cache_root() / "open_clip" / f"{TINY_CLIP_NAME}.json"
    text = json.dumps(TINY_CLIP_CONFIG, indent=1)
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def parse_clip_models(spec: str | None) -> list[tuple[str, str | None]]:
    """'NAME:PRETRAINED,...' | 'tiny' | 'toy' | 'none' (no CLIP) | None (the paper's two)
    -> [(name, pretrained or None)].

    The pretrained part may be a path with ':' in it (only the first ':' splits); 'none' or '' mean random weights."""
    if spec is None:
        return [(n, p) for n, p in PAPER_MODELS]
    if spec.strip().lower() == "none":
        return []
    models = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, pretrained = item.partition(":")
        if not name:
            raise ValueError(f"CLIP model spec '{item}' has no model name; use NAME:PRETRAINED, e.g. ViT-L-14:openai")
        models.append((name, None if pretrained.lower() in ("", "none") else pretrained))
    if not models:
        raise ValueError(f"CLIP model spec '{spec}' names no model; use NAME:PRETRAINED[,NAME:PRETRAINED]")
    return models


def model_label(name: str, pretrained: str | None) -> str:
    return name if name in ("tiny", "toy") else f"{name}:{pretrained or 'none'}"


def load_scorer(name: str, pretrained: str | None, device: torch.device | str = "cpu") -> ClipScorer:
    """A ClipScorer; 'tiny' is the seeded random-weight toy model, 'toy' the CLIP trained on the toy world.
    Creation never moves the caller's RNG streams."""
    import open_clip

    if name == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(TINY_CLIP_SEED)
            return ClipScorer.load(register_tiny_clip(), None, device)
    if name == "toy":
        with torch.random.fork_rng():
            scorer = ClipScorer.load(*register_toy_clip(), device)
        scorer.name = "toy"
        return scorer
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model '{name}'; e.g. ViT-L-14, ViT-bigG-14 (open_clip.list_models()), "
                         f"'tiny' or 'toy'")
    with torch.random.fork_rng():
        return ClipScorer.load(name, pretrained, device)


def load_scorers(models: Sequence[tuple[str, str | None]], device) -> dict[str, ClipScorer]:
    return {model_label(n, p): load_scorer(n, p, device) for n, p in models}


@torch.no_grad()
def rig_images(gaussians, bg: torch.Tensor, resolution: int, backend: str = "auto", n_azimuths: int = 8,
               radius: float = 4.0) -> torch.Tensor:
    """The evaluation rig's renders [2 n_azimuths, 3, R, R] in [0, 1] (elevation 0 first, then 45)."""
    cams = eval_rig_cameras(resolution, resolution, radius=radius, n_azimuths=n_azimuths, device=bg.device)
    return render_views(cams, gaussians, bg, backend)


def clip_scores(scorers: dict[str, ClipScorer], images: torch.Tensor, text: str) -> dict[str, dict]:
    """Per model: {"mean": mean over views, "views": per-view similarity list}."""
    out = {}
    for label, scorer in scorers.items():
        views = scorer.similarity(images, text).double()
        out[label] = {"mean": views.mean().item(), "views": views.tolist()}
    return out
