"""A run's Gaussians as a mesh: mesh.glb and mesh.obj with vertex colours.

    python export_mesh.py output/<workspace> [--resolution 256] [--threshold 0.5] [--out DIR] [--y-up]
    python export_mesh.py path/to/point_cloud.ply [...]

A run folder gives its final model (the PLY its completion marker train_done.json names) and its config's
mesh_resolution / mesh_threshold as defaults; a 3DGS PLY file is exported as it is. The surface is the level set
of the opacity field sum_i o_i G_i(x) (marching cubes on a grid), coloured by the Gaussians' view-independent (SH DC)
colours; see scene/mesh_export.py. `save_mesh: true` in a config does the same at the end of train.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from arguments import RunError
from scene.mesh_export import export_model_mesh
from scene.nerf_io import export_nerf_mesh, load_model
from scene.ply_io import read_ply
from stages.run import model_source, run_entry
from utils.device import resolve_device


def main(source: str | Path, *, resolution: Optional[int] = None, threshold: Optional[float] = None,
         out: Optional[str | Path] = None, y_up: bool = False, device: str = "auto") -> list[Path]:
    """Export mesh.glb and mesh.obj of `source` into `out` (default: the run folder, or the PLY's folder). Returns
    the written paths."""
    source = Path(source)
    ply, cfg = model_source(source)
    nerf = cfg.ModelParams.representation == "nerf"  # its nerf.safetensors: the level set of the density field
    if not nerf and any(e.name == "vertex" and e.count == 0 for e in read_ply(str(ply)).elements):
        raise RunError(f"{ply} holds no Gaussians: there is nothing to mesh; pass a trained model (a finished run "
                       f"folder or its final point_cloud.ply)")
    gaussians = load_model(ply, resolve_device(device, "--device"))
    folder = Path(out) if out is not None else (source if source.is_dir() else ply.parent)
    resolution = cfg.mesh_resolution if resolution is None else resolution
    threshold = cfg.mesh_threshold if threshold is None else threshold
    mesh, paths = (export_nerf_mesh if nerf else export_model_mesh)(gaussians, folder, resolution, threshold,
                                                                    y_up=y_up)
    what = f"NeRF ({gaussians.num_points} occupied cells)" if nerf else f"{gaussians.num_points} Gaussians"
    print(f"{ply}: {what} -> {len(mesh.vertices)} vertices, {len(mesh.faces)} faces "
          f"(resolution {resolution}, threshold {threshold:g}, {'Y' if y_up else 'Z'} up)")
    return paths


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a run's Gaussians as mesh.glb and mesh.obj (marching cubes of the opacity field, vertex "
                    "colours from the Gaussians' SH DC colours).")
    parser.add_argument("source", help="a run folder (output/<workspace>: its final model), a 3DGS .ply file or a "
                                       "NeRF run's nerf.safetensors")
    parser.add_argument("--resolution", type=int, default=None,
                        help="grid points along the longest side of the Gaussians' box, 8..1024 (default: the run's "
                             "mesh_resolution, 256); cost grows with its cube")
    parser.add_argument("--threshold", type=float, default=None,
                        help="level of the opacity field sum_i o_i G_i(x) taken as the surface, > 0 (default: the "
                             "run's mesh_threshold, 0.5); lower it for a fuller mesh of faint models")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder, or the PLY's folder)")
    parser.add_argument("--y-up", action="store_true",
                        help="rotate to glTF's convention, Y up with the front facing +Z: (x, y, z) -> (-x, z, y). "
                             "Without it the mesh keeps the world's coordinates: Z up, front facing +Y (as the PLY)")
    parser.add_argument("--device", default="auto", help="torch device of the grid evaluation: auto | cpu | cuda[:N]")
    args = parser.parse_args(argv)

    def run() -> None:
        for path in main(args.source, resolution=args.resolution, threshold=args.threshold, out=args.out,
                         y_up=args.y_up, device=args.device):
            print(f"wrote {path}")
    return run_entry(run)


if __name__ == "__main__":
    sys.exit(cli())
