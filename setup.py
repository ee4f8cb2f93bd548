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
                                    "jobs", "utils", "toyworld"]),
    # the toy world's trained prior and CLIP (model_key: toy, --clip-models toy)
    package_data={"toyworld": ["weights/*/*", "weights/*/*/*"]},
    # the Hugging Face minimums are the releases bench/oldest_deps.sh runs the LoRA and half-precision tests against:
    # diffusers 0.34 stores lora_alpha in LoRA files (guidance/hf_compat.py), and needs peft >= 0.15 itself; peft 0.15
    # needs accelerate >= 0.32, accelerate < 0.34 caps numpy below 2, and accelerate 0.34 needs safetensors >= 0.4.3
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.34",
        "transformers>=4.44.2",
        "peft>=0.15",
        "accelerate>=0.34.2",
        "huggingface_hub>=0.27",
        "safetensors>=0.4.3",
        "plyfile>=1.0",
        "trimesh>=4.0",
        "scikit-image>=0.19",  # marching cubes of the mesh export (export_mesh.py, save_mesh)
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
