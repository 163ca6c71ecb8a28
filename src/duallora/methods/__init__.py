"""Continual-learning methods: one file per method, registered by name (in the spirit of Mammoth).

Every method is a :class:`ContinualMethod` with a few hooks that the shared training loop
(:class:`~duallora.training.ContinualLearner`) calls (see :mod:`duallora.methods.base`), declares the
``method.*`` config keys it reads (:class:`~duallora.methods.options.Option`) and registers itself
with :func:`register_method`. The config (:mod:`duallora.config`) derives ``MethodConfig`` and the
allowed ``method.name`` values from the registry.

==============  ==============================================================================
``duallora``    orthogonal + residual adapters, subspace memory, dynamic gates, calibrated
                output (docs/method.md; :mod:`duallora.methods.duallora`)
``frozen``      frozen backbone, per-task heads (reference)
``seq-lora``    one plain LoRA fine-tuned task after task (reference)
``inflora``     a LoRA branch per task on the attention key/value outputs, down-projection fixed
                orthogonal to a GPM memory, up-projection trained (Liang and Li, CVPR 2024)
``sd-lora``     earlier tasks' normalised LoRA directions fixed, their magnitudes and the new
                LoRA learned (Wu et al., ICLR 2025)
``l2p``         a prompt pool with keys, prompts chosen per image by a query pass, prepended in a
                second, prompted pass (Wang et al., CVPR 2022)
``simplecil``   frozen backbone, cosine classifier on class prototypes (Zhou et al., 2023)
``fecam``       frozen backbone, Mahalanobis classifier with per-class (as published) or pooled
                covariances (Goswami et al., NeurIPS 2023)
``ranpac``      frozen backbone, random projection + ReLU, ridge-regression head in closed form
                (McDonnell et al., NeurIPS 2023; without its first-task fine-tuning)
``ncm-gate``    frozen backbone, Mahalanobis nearest class mean on the features DualLoRA's shared
                gate reads (mean tokens entering blocks 0..gate_layer)
``joint``       one LoRA and the heads trained on the data of every task seen so far: an upper
                bound, NOT continual and NOT rehearsal-free
==============  ==============================================================================

A new method is one file; nothing else needs an edit (tests/test_registry.py registers one)::

    from torch.nn import functional as F

    from duallora.methods import ContinualMethod, Option, register_method
    from duallora.methods.options import positive_int

    @register_method
    class HeadDecay(ContinualMethod):  # frozen backbone, per-task heads, an L2 penalty on the head

        name = "head-decay"                       # method.name=head-decay
        uses_adapters = False                     # no adapted layers (so no adapted_modules option)
        options = {"decay": Option(1, "weight of the head penalty, in 1e-3", check=positive_int)}

        def loss(self, logits, labels, images, task):
            penalty = self.model.heads[task].weight.pow(2).sum()
            return F.cross_entropy(logits, labels) + 1e-3 * self.cfg.decay * penalty

Import the file before ``load_config`` (``method.name=head-decay method.decay=3`` then works, and
``method.decay=3`` with another method is refused). Options shared with other methods are taken
from :mod:`duallora.methods.options` (``ADAPTED_MODULES``, ``RANK_ORTHOGONAL``, ``TAU_ID``, ...).

The order of :data:`BUILTIN_MODULES` is the registration order: it fixes the order of ``method.name`` choices and
of the ``MethodConfig`` keys (``--print-config``, ``config.yaml``).
"""

import importlib

from duallora.methods.base import ContinualMethod, Inference, TaskContext, posterior_from_probs
from duallora.methods.calibration import calibrate
from duallora.methods.options import Option
from duallora.methods.registry import (
    METHODS,
    build_method,
    get_method,
    method_names,
    method_options,
    register_method,
    unregister_method,
)

#: Modules of the built-in methods, in registration order (each registers its class on import).
BUILTIN_MODULES = ("duallora", "frozen", "seq_lora", "inflora", "sd_lora", "l2p", "simplecil", "fecam", "ranpac",
                   "ncm_gate", "joint")
for _module in BUILTIN_MODULES:
    importlib.import_module(f"duallora.methods.{_module}")

from duallora.methods.branches import LowRankBranches  # noqa: E402
from duallora.methods.duallora import DualLoRA  # noqa: E402
from duallora.methods.fecam import FeCAM  # noqa: E402
from duallora.methods.frozen import Frozen  # noqa: E402
from duallora.methods.inflora import InfLoRA  # noqa: E402
from duallora.methods.joint import Joint  # noqa: E402
from duallora.methods.l2p import L2P  # noqa: E402
from duallora.methods.ncm_gate import NCMGate  # noqa: E402
from duallora.methods.ranpac import RanPAC  # noqa: E402
from duallora.methods.sd_lora import SDLoRA  # noqa: E402
from duallora.methods.seq_lora import SeqLoRA  # noqa: E402
from duallora.methods.simplecil import SimpleCIL  # noqa: E402

__all__ = [
    "METHODS", "ContinualMethod", "DualLoRA", "FeCAM", "Frozen", "InfLoRA", "Inference", "Joint", "L2P",
    "LowRankBranches", "NCMGate", "Option", "RanPAC", "SDLoRA", "SeqLoRA", "SimpleCIL", "TaskContext",
    "build_method", "calibrate",
    "get_method", "method_names", "method_options", "posterior_from_probs", "register_method",
    "unregister_method",
]
