"""Path-Tracing Distillation (PTD) on a LucidDreamer-style 3D Gaussian splatting codebase."""
from setuptools import find_packages, setup

setup(
    name="ptd3d",
    version="0.1.0",
    description="Path-Tracing Distillation for text-to-3D: LucidDreamer (3DGS + ISM) with a path LoRA",
    python_requires=">=3.10",
    # the library packages only: the entry scripts (train.py, form_path.py, evaluate.py, probe_ood.py, batch.py) run
    # from the checkout, as in LucidDreamer, so that nothing installed shadows a common module name (`evaluate`)
    packages=find_packages(include=["arguments", "scene", "gaussian_renderer", "guidance", "stages", "evaluation",
                                    "jobs", "utils"]),
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.32",
        "transformers>=4.44",
        "peft>=0.13",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "plyfile>=1.0",
        "trimesh>=4.0",
        "scipy>=1.10",
        "open_clip_torch>=2.24",
        "imageio>=2.31",
        "imageio-ffmpeg>=0.4.9",
        "pyyaml>=6.0",
        "tqdm>=4.65",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "pillow>=10.0",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        # CUDA rasterizer from PyPI (compiles its kernels on first use; needs a CUDA toolkit)
        "gsplat": ["gsplat>=1.4"],
        # batch.py on a Ray cluster (batch.py --local needs nothing more)
        "batch": ["ray>=2.9"],
    },
)
