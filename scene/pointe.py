"""Point-E text-to-point-cloud sampling (stock LucidDreamer's optional initialisation). Importing this module
needs the `point_e` package; scene.initialization turns the ImportError into a one-line InitError."""
from __future__ import annotations

import numpy as np
import torch
from point_e.diffusion.configs import DIFFUSION_CONFIGS, diffusion_from_config
from point_e.diffusion.sampler import PointCloudSampler
from point_e.models.configs import MODEL_CONFIGS, model_from_config
from point_e.models.download import load_checkpoint


def sample_pointe(prompt: str, device=None) -> np.ndarray:
    """4096 points [4096, 3] for `prompt`: base40M-textvec (1024 points, guidance 3) + upsampler (3072 more)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    models, diffusions = [], []
    for name in ("base40M-textvec", "upsample"):
        model = model_from_config(MODEL_CONFIGS[name], device)
        model.eval()
        model.load_state_dict(load_checkpoint(name, device))
        models.append(model)
        diffusions.append(diffusion_from_config(DIFFUSION_CONFIGS[name]))
    sampler = PointCloudSampler(device=device, models=models, diffusions=diffusions, num_points=[1024, 4096 - 1024],
                                aux_channels=["R", "G", "B"], guidance_scale=[3.0, 0.0],
                                model_kwargs_key_filter=("texts", ""))
    samples = None
    for samples in sampler.sample_batch_progressive(batch_size=1, model_kwargs=dict(texts=[prompt])):
        pass
    return np.asarray(sampler.output_to_point_clouds(samples)[0].coords, dtype=np.float64)
