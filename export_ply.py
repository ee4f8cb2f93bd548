"""A run's Gaussians as a 3DGS PLY in Y-up axes, for splat viewers and glTF tools.

    python export_ply.py output/<workspace> --y-up [--out PATH]     # -> <run>/point_cloud_y_up.ply
    python export_ply.py path/to/point_cloud.ply --y-up [--out PATH] # -> path/to/point_cloud_y_up.ply

Our world is Z up with the front facing +Y (LucidDreamer's cameras); glTF, and the splat viewers and Blender add-ons
that follow it, take Y as up. --y-up turns the whole model by the rotation export_mesh.py --y-up uses,
(x, y, z) -> (-x, z, y) (Y up, front facing +Z; det +1, so handedness is kept), with scene/geometry.py's
rotate_gaussians: positions, orientations and the view-dependent SH colours turn together, so the model looks from
every rotated camera as it did before. Without --y-up the model is written in the world's axes
(<run>/point_cloud_z_up.ply). A run folder gives its final model, the PLY that train_done.json names, as for
export_mesh.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from arguments import RunError
from scene.geometry import rotate_gaussians
from scene.mesh_export import Z_UP_TO_Y_UP
from scene.ply_io import read_gaussian_ply, write_gaussian_ply
from stages.run import model_source, run_entry


def output_path(source: Path, ply: Path, out: Optional[str | Path], y_up: bool) -> Path:
    """--out (a .ply file, or an existing folder for the default name), else <run>/point_cloud_<axes>.ply for a run
    folder and <stem>_<axes>.ply beside a PLY file. Never the input itself."""
    tag = "y_up" if y_up else "z_up"
    name = f"point_cloud_{tag}.ply" if source.is_dir() else f"{ply.stem}_{tag}.ply"
    if out is None:
        path = (source if source.is_dir() else ply.parent) / name
    elif Path(out).is_dir():
        path = Path(out) / name
    elif Path(out).suffix.lower() == ".ply":
        path = Path(out)
    else:
        raise RunError(f"--out {out} is neither a .ply file name nor an existing folder; pass e.g. --out model.ply")
    if path.resolve() == ply.resolve():
        raise RunError(f"--out {path} is the input PLY itself; pass another file name")
    return path


def main(source: str | Path, *, y_up: bool = False, out: Optional[str | Path] = None) -> Path:
    """Write `source`'s Gaussians (turned to Y up with y_up) to a new PLY; returns its path."""
    source = Path(source)
    ply, _ = model_source(source)
    path = output_path(source, ply, out, y_up)
    data = read_gaussian_ply(str(ply))  # one-line PlyFormatError for anything that is no 3DGS PLY
    n = len(data["xyz"])
    if n == 0:
        raise RunError(f"{ply} holds no Gaussians: there is nothing to export; pass a trained model (a finished run "
                       f"folder or its final point_cloud.ply)")
    xyz, rot, rest = data["xyz"], data["rot"], data["f_rest"]  # f_rest [N, 3, K-1]: channel before basis
    if y_up:
        with torch.no_grad():
            turned = rotate_gaussians(torch.from_numpy(xyz).double(), torch.from_numpy(rot).double(),
                                      torch.from_numpy(rest).double().transpose(1, 2), torch.from_numpy(Z_UP_TO_Y_UP))
        xyz, rot, rest = turned[0].numpy(), turned[1].numpy(), turned[2].transpose(1, 2).numpy()
    write_gaussian_ply(str(path), xyz, data["f_dc"], np.ascontiguousarray(rest), data["opacity"], data["scale"], rot)
    axes = "Y up: (x, y, z) -> (-x, z, y)" if y_up else "Z up (the world's axes)"
    print(f"{ply}: {n} Gaussians, SH degree {data['sh_degree']}, {axes}")
    return path


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a run's Gaussians as a 3DGS PLY, turned to Y up for splat viewers and glTF tools.")
    parser.add_argument("source", help="a run folder (output/<workspace>: its final model) or a 3DGS .ply file")
    parser.add_argument("--y-up", action="store_true",
                        help="rotate to glTF's convention, Y up with the front facing +Z: (x, y, z) -> (-x, z, y), "
                             "positions, orientations and SH colours together (as export_mesh.py --y-up). Without "
                             "it the model keeps the world's coordinates: Z up, front facing +Y")
    parser.add_argument("--out", default=None,
                        help="output .ply file, or an existing folder (default: <run>/point_cloud_y_up.ply for a run "
                             "folder, <name>_y_up.ply beside a PLY file; _z_up without --y-up)")
    args = parser.parse_args(argv)

    def run() -> None:
        print(f"wrote {main(args.source, y_up=args.y_up, out=args.out)}")
    return run_entry(run)


if __name__ == "__main__":
    sys.exit(cli())
