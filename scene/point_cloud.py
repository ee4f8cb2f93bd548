"""Point clouds as the initialisations hand them over: the PointCloud record, its validation, and the kNN distances
that set the Gaussians' initial scales (stock simple-knn's distCUDA2: mean squared distance to the 3 nearest other
points, floored at 1e-7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.spatial import cKDTree

KNN_MIN_DIST2 = 1e-7  # simple-knn floor of the mean squared neighbour distance


class InitError(ValueError):
    """The initial 3D model cannot be built from what was given."""


@dataclass
class PointCloud:
    points: np.ndarray  # [N, 3] float64
    colors: np.ndarray  # [N, 3] float64 in [0, 1]


def validate_point_cloud(points: np.ndarray, colors: Optional[np.ndarray], source: str) -> PointCloud:
    """Check shapes and finiteness; missing colours become stock's grey (0.5)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InitError(f"{source}: points must have shape [N, 3], got {list(points.shape)}")
    if points.shape[0] == 0:
        raise InitError(f"{source}: the point cloud is empty; give a file with at least one point")
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        raise InitError(f"{source}: {bad} point(s) have NaN or infinite coordinates; clean the file first")
    if colors is None:
        colors = np.full_like(points, 0.5)
    colors = np.asarray(colors, dtype=np.float64)
    if colors.shape != points.shape or not np.isfinite(colors).all():
        raise InitError(f"{source}: colours must be finite with shape {list(points.shape)}, got "
                        f"{list(colors.shape)}")
    return PointCloud(points, np.clip(colors, 0.0, 1.0))


def mean_sq_dist_knn(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean squared distance of each point to its k nearest other points, floored at 1e-7 ([N] float64)."""
    n = points.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return np.full(n, KNN_MIN_DIST2)
    dist, _ = cKDTree(points).query(points, k=kk + 1)  # column 0 is the point itself
    return np.maximum((dist[:, 1:] ** 2).mean(axis=1), KNN_MIN_DIST2)
