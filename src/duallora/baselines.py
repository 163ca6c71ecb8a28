"""Compatibility module: the baselines now live one per file in :mod:`duallora.methods`.

``inflora`` (:mod:`duallora.methods.inflora`), ``sd-lora`` (:mod:`~duallora.methods.sd_lora`),
``l2p`` (:mod:`~duallora.methods.l2p`), ``simplecil`` (:mod:`~duallora.methods.simplecil`),
``fecam`` (:mod:`~duallora.methods.fecam`) and ``joint`` (:mod:`~duallora.methods.joint`); the
low-rank branches of InfLoRA and SD-LoRA are in :mod:`duallora.methods.branches`. Import from there.
"""

from __future__ import annotations

from duallora.methods import L2P, FeCAM, InfLoRA, Joint, LowRankBranches, SDLoRA, SimpleCIL
from duallora.methods.base import ContinualMethod

#: The baselines by config name (a snapshot; the registry is :data:`duallora.methods.METHODS`).
BASELINES: dict[str, type[ContinualMethod]] = {m.name: m for m in (InfLoRA, SDLoRA, L2P, SimpleCIL, FeCAM, Joint)}

__all__ = ["BASELINES", "FeCAM", "InfLoRA", "Joint", "L2P", "LowRankBranches", "SDLoRA", "SimpleCIL"]
