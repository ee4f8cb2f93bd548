"""CLIP similarity by the paper's protocol (§6.1): cosine(image, text) x 100, averaged over the 16 rig views.

Models: OpenAI ViT-L/14 (`ViT-L-14`, tag `openai`) and ViT-bigG-14 (`ViT-bigG-14`, tag `laion2b_s39b_b160k`), through
open_clip. `pretrained` is a tag (downloaded by open_clip on a machine with internet, then cached) or a local weights
file; offline without weights, loading fails with one line saying how to get them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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
