"""Where and how reproducibly a run computes: the torch device (``train.device``) and the RNG seeds.

Low-level on purpose: :mod:`duallora.runner` (``distributed.init`` before any learner exists) and
:class:`~duallora.training.ContinualLearner` both use it, without one importing the other.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from duallora.errors import TrainingError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; other names are passed to torch.

    Raises:
        TrainingError: a named device that is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"train.device={name!r} is not a device name (auto, cpu, cuda, cuda:0, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA GPU is available; use train.device=auto or cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
