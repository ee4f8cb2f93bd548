"""Leaf helpers that import nothing of the project: atomic files, RNG state, images and video, losses, prompts."""
