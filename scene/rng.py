"""A seeded random source over a torch.Generator or a numpy Generator: never the global RNG."""
from __future__ import annotations

import numpy as np
import torch


class SeededRng:
    """One interface over a seeded torch.Generator or numpy Generator (never the global RNG)."""

    def __init__(self, generator):
        if isinstance(generator, SeededRng):
            generator = generator.gen
        if isinstance(generator, (int, np.integer)):
            generator = np.random.default_rng(int(generator))
        if not isinstance(generator, (torch.Generator, np.random.Generator)):
            raise TypeError("needs a seeded torch.Generator, numpy Generator or int seed, "
                            f"got {type(generator).__name__}")
        self.gen = generator

    def uniform(self, *shape: int) -> np.ndarray:
        if isinstance(self.gen, np.random.Generator):
            return self.gen.random(shape)
        return torch.rand(shape, generator=self.gen, dtype=torch.float64, device=self.gen.device).cpu().numpy()

    def normal(self, *shape: int) -> np.ndarray:
        if isinstance(self.gen, np.random.Generator):
            return self.gen.standard_normal(shape)
        return torch.randn(shape, generator=self.gen, dtype=torch.float64, device=self.gen.device).cpu().numpy()

    def integers(self, high: int) -> int:
        if isinstance(self.gen, np.random.Generator):
            return int(self.gen.integers(high))
        return int(torch.randint(high, (1,), generator=self.gen, device=self.gen.device).item())

    def get_state(self):
        if isinstance(self.gen, np.random.Generator):
            return self.gen.bit_generator.state
        return self.gen.get_state()

    def set_state(self, state) -> None:
        if isinstance(self.gen, np.random.Generator):
            self.gen.bit_generator.state = state
        else:
            self.gen.set_state(state)
