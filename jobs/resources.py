"""GPUs per batch job, by Ray's rules for `num_gpus`: a share of one GPU (0.25: four jobs on a GPU) or whole GPUs.

Pure functions: batch.py checks --gpus-per-job with `parse_gpus_per_job` and sizes the batch with `gpu_slots`;
Ray itself places the tasks (and sets each one's CUDA_VISIBLE_DEVICES), the same way.
"""
from __future__ import annotations

import math

# Ray counts resources in fixed point, 1/10000 of a unit (ray._raylet.RESOURCE_UNIT_SCALING): its finest GPU share
RAY_RESOURCE_UNIT = 10_000


def parse_gpus_per_job(text: str) -> float:
    """The value of --gpus-per-job: 0 (the job gets no GPU), a share f of one GPU (1/10000 <= f <= 1) or a whole
    number of GPUs (Ray gives no job 1.5 GPUs). Whole values come back as int. Raises ValueError (one line)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of GPUs (e.g. 1, 0.25 or 2), got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected 0, a share of one GPU in (0, 1] or a whole number of GPUs, got '{text}'")
    if value > 1 and not value.is_integer():
        raise ValueError(f"{text} GPUs: above 1 a job takes whole GPUs (Ray's rule), e.g. {math.floor(value)} or "
                         f"{math.ceil(value)}")
    if 0 < value < 1 / RAY_RESOURCE_UNIT:
        raise ValueError(f"{text} GPUs: Ray's finest share of a GPU is {1 / RAY_RESOURCE_UNIT:g}")
    return int(value) if value.is_integer() else value


def jobs_per_gpu(gpus_per_job: float) -> int:
    """How many jobs asking for a share `gpus_per_job` (0 < f <= 1) of a GPU fit on one: floor(1 / f), counted in
    Ray's units (0.3 -> 3, 0.25 -> 4, 0.3333 -> 3)."""
    if not 0 < gpus_per_job <= 1:
        raise ValueError(f"a share of one GPU is in (0, 1], got {gpus_per_job}")
    return RAY_RESOURCE_UNIT // round(gpus_per_job * RAY_RESOURCE_UNIT)


def gpu_slots(num_gpus: int, gpus_per_job: float) -> list[tuple[int, ...]]:
    """The GPUs (CUDA_VISIBLE_DEVICES ids) of each job that can run at once on GPUs 0 .. num_gpus - 1, packed as Ray
    packs them: a share f <= 1 never spans two GPUs, so each GPU holds floor(1 / f) jobs; n whole GPUs give each job
    n GPUs of its own, and the num_gpus mod n left over stay idle.

    Example: 2 GPUs at 0.25 -> [(0,), (0,), (0,), (0,), (1,), (1,), (1,), (1,)]; 5 GPUs at 2 -> [(0, 1), (2, 3)].
    """
    if gpus_per_job <= 0:
        raise ValueError(f"a job without a GPU takes no GPU slot (gpus_per_job={gpus_per_job})")
    if gpus_per_job <= 1:
        return [(gpu,) for gpu in range(num_gpus) for _ in range(jobs_per_gpu(gpus_per_job))]
    if not float(gpus_per_job).is_integer():
        raise ValueError(f"above 1 a job takes whole GPUs, got {gpus_per_job}")
    n = int(gpus_per_job)
    return [tuple(range(k * n, (k + 1) * n)) for k in range(num_gpus // n)]
