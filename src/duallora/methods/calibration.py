"""Calibrated output: class probabilities from logits and a task posterior (docs/method.md,
"Inference: one forward pass", calibrated output)."""

from __future__ import annotations

import torch

from duallora.methods.base import class_task_index


def calibrate(logits: torch.Tensor, posterior: torch.Tensor, sizes: list[int], mode: str,
              threshold: float = 0.9) -> torch.Tensor:
    """Calibrated class probabilities (method.md, "Calibrated output").

    Args:
        logits: (B, C) concatenated head logits, classes grouped by task in task order.
        posterior: (B, T) task posterior p(j | x).
        sizes: classes per task, ``sum(sizes) == C``.
        mode: ``none`` (softmax over all logits), ``product``
            (``p(task(y) | x) * softmax over the classes of task(y)``), or ``hard`` (when
            ``max_j p(j | x) >= threshold``, only the predicted task's classes keep probability
            (its within-task softmax); otherwise ``product``).

    Returns:
        (B, C) probabilities; rows sum to 1.

    Raises:
        ValueError: unknown mode.
    """
    if mode == "none":
        return torch.softmax(logits, dim=1)
    if mode not in ("product", "hard"):
        raise ValueError(f"unknown calibration {mode!r}")
    if len(set(sizes)) == 1:  # equal task sizes: one softmax over a (B, T, C_t) view
        B, T = logits.shape[0], len(sizes)
        within3 = torch.softmax(logits.reshape(B, T, sizes[0]), dim=2)
        within = within3.view(B, -1)
        if mode == "product":
            return (within3 * posterior[:, :, None]).view(B, -1)
    else:
        within = torch.cat([torch.softmax(chunk, dim=1) for chunk in logits.split(sizes, dim=1)], dim=1)
    idx = class_task_index(sizes, logits.device)
    probs = within * posterior[:, idx]
    if mode == "hard":
        conf, pred = posterior.max(dim=1)
        sure = conf >= threshold
        hard = within * (idx[None, :] == pred[:, None]).to(within.dtype)
        probs = torch.where(sure[:, None], hard, probs)
    return probs
