"""The renderer's error, in its own module so that the backends and the dispatcher share it without a circle."""


class BackendUnavailableError(RuntimeError):
    """A rasteriser backend was asked for where it cannot run (no CUDA, package missing)."""
