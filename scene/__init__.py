"""Scene: Gaussians (GaussianModel), cameras (Camera, OrbitCameraSampler, evaluation rig, video path) and the
initial point clouds. Importing has no side effects."""
from scene.cameras import (Camera, OrbitCameraSampler, eval_rig_cameras, make_camera, orbit_camera,
                           circle_cameras)
from scene.gaussian_model import GaussianModel
from scene.initialization import initial_point_cloud
from scene.ply_io import PlyFormatError
from scene.point_cloud import InitError, PointCloud

__all__ = ["Camera", "OrbitCameraSampler", "eval_rig_cameras", "make_camera", "orbit_camera", "circle_cameras",
           "GaussianModel", "InitError", "PointCloud", "initial_point_cloud", "PlyFormatError"]
