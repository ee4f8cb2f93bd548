"""A run's mesh: written beside its Gaussians with the run's mesh settings (train.py with `save_mesh: true`,
export_mesh.py). The math is scene/mesh_export.py."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import trimesh

from arguments import Config, RunError, run_dir
from scene.mesh_export import MeshExportError, export_model_mesh
from scene.nerf_io import export_nerf_mesh


def export_run_mesh(cfg: Config, gaussians, folder: Optional[Path] = None, *, resolution: Optional[int] = None,
                    threshold: Optional[float] = None, y_up: bool = False) -> tuple[trimesh.Trimesh, list[Path]]:
    """mesh.glb + mesh.obj of `gaussians` into `folder` (default: the run folder), at the given resolution and
    threshold (default: the config's mesh_resolution and mesh_threshold). A model that gives no mesh is a one-line
    RunError that says how to export again."""
    folder = run_dir(cfg) if folder is None else Path(folder)
    resolution = cfg.mesh_resolution if resolution is None else resolution
    threshold = cfg.mesh_threshold if threshold is None else threshold
    export = export_nerf_mesh if getattr(gaussians, "is_radiance_field", False) else export_model_mesh
    try:
        return export(gaussians, folder, resolution, threshold, y_up=y_up)
    except MeshExportError as err:
        raise RunError(f"no mesh: {err}; the Gaussians are saved, so `python export_mesh.py {run_dir(cfg)} "
                       f"--threshold T --resolution R` exports again") from None
