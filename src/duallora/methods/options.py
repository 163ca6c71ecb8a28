"""Config options that methods declare next to their code, and the options several methods share.

A method lists the ``method.*`` keys it reads in its class attribute ``options``
(``{key: Option(...)}``); :mod:`duallora.config` builds ``MethodConfig`` from the union of the
registered methods' options (:func:`duallora.methods.registry.all_options`), so a key exists as soon
as a method that reads it is registered, and ``check_method_keys`` knows which method reads which key.

Options that several methods read (``adapted_modules``, ``rank_orthogonal``, the energy thresholds,
``stat_images``, ``tau_id``, ``ridge``, ``shrinkage``) are declared once here and referenced by each method that
reads them; the registry refuses two declarations of one key that disagree on default, type or
choices.
"""

from __future__ import annotations

import dataclasses
import keyword
from dataclasses import dataclass
from typing import Any, Callable, Optional

from duallora.errors import ConfigError
from duallora.placements import PLACEMENTS, entry_error

#: The named placements ``method.adapted_modules`` accepts besides module paths and regular
#: expressions: a read-only live view of :data:`duallora.placements.PLACEMENTS` (``name in``,
#: iteration over the names), not a second list.
ADAPTABLE_MODULES = PLACEMENTS

#: ``check(key, value, method_cfg)``: the error message for a bad value (its first word the dotted
#: key), or None when the value is fine. ``method_cfg`` is the whole method section, for checks that
#: involve another key.
Check = Callable[[str, Any, Any], Optional[str]]


@dataclass(frozen=True)
class Option:
    """One ``method.<key>`` config option.

    Args:
        default: the default value (a list default is copied for every config).
        help: one line for ``MethodConfig``'s documentation (what it is, its unit, who reads it).
        type: the value's type for OmegaConf's validation; None = the default's type (``bool``,
            ``int``, ``float`` or ``str``). Give it for a None or list default, e.g.
            ``Optional[int]`` or ``list[str]``.
        choices: allowed values (strings); the config rejects any other, naming them.
        check: extra validation, see :data:`Check`; runs for every registered option, whatever the
            chosen method (like the old schema-wide range checks).
        rank: the value is a rank of factors on the adapted layers' inputs: the learner refuses one
            above the layers' input width (when the chosen method reads the option).

    Raises:
        TypeError: a default without a type that can be derived from it, or a default outside ``choices``.
    """

    default: Any
    help: str
    type: Any = None
    choices: tuple = ()
    check: Optional[Check] = None
    rank: bool = False

    def __post_init__(self) -> None:
        if self.type is None:
            for tp in (bool, int, float, str):  # bool first: it is an int too
                if isinstance(self.default, tp):
                    object.__setattr__(self, "type", tp)
                    break
            else:
                raise TypeError(f"Option(default={self.default!r}) needs an explicit type=")
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.choices and self.default not in self.choices:
            raise TypeError(f"Option default {self.default!r} is not one of its choices {self.choices}")

    def field(self) -> dataclasses.Field:
        """A dataclass field with this default (a fresh copy of a list default per instance)."""
        if isinstance(self.default, (list, dict)):
            value = self.default
            return dataclasses.field(default_factory=lambda: type(value)(value))
        return dataclasses.field(default=self.default)

    def signature(self) -> tuple:
        """What two declarations of one key must agree on: default, type and choices."""
        return (repr(self.default), repr(self.type), self.choices)

    def validate(self, key: str, method_cfg: Any) -> None:
        """Run :attr:`check` on ``method_cfg.<key>``.

        Raises:
            ConfigError: the check's message.
        """
        if self.check is not None:
            message = self.check(key, getattr(method_cfg, key), method_cfg)
            if message:
                raise ConfigError(message)


def check_option_name(key: str) -> None:
    """Raise ValueError unless ``key`` can be a config key (a Python identifier other than ``name``)."""
    if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key) or key == "name":
        raise ValueError(f"{key!r} cannot be a method option (need an identifier other than 'name')")


# ------------------------------------------------------------------ reusable checks
def positive_int(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``value >= 1``."""
    return f"method.{key}={value} must be a positive integer" if value < 1 else None


def positive_int_or_null(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``value >= 1`` or None (= all images)."""
    if value is not None and value < 1:
        return f"method.{key}={value} must be a positive integer or null (all images)"
    return None


def positive(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``value > 0``."""
    return f"method.{key}={value} must be > 0" if value <= 0 else None


def positive_or_null(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``value > 0`` or None."""
    return f"method.{key}={value} must be > 0 or null" if value is not None and value <= 0 else None


def non_negative(key: str, value: Any, cfg: Any) -> Optional[str]:
    """``value >= 0``."""
    return f"method.{key}={value} must be >= 0" if value < 0 else None


def energy(key: str, value: Any, cfg: Any) -> Optional[str]:
    """An energy fraction in (0, 1]."""
    return None if 0.0 < value <= 1.0 else f"method.{key}={value} must lie in (0, 1]"


def probability(key: str, value: Any, cfg: Any) -> Optional[str]:
    """A probability in [0, 1]."""
    return None if 0.0 <= value <= 1.0 else f"method.{key} must lie in [0, 1]"


def module_names(key: str, value: Any, cfg: Any) -> Optional[str]:
    """Every entry a registered placement name, a module path or a valid regular expression
    (:func:`duallora.placements.entry_error`); whether a path or pattern matches a layer is checked
    when the model is built. Emptiness is the method's concern."""
    for mod in value:
        message = entry_error(mod)
        if message:
            return f"method.{key} contains '{mod}': {message}"
    return None


# ------------------------------------------------------------------ shared options
ADAPTED_MODULES = Option(["qkv"], "layers that carry adapters: placement names (qkv | proj | fc1 | fc2, in every "
                                   "block; duallora.placements), module path suffixes (attn.qkv) or regular "
                                   "expressions of the whole path (blocks\\.[0-5]\\.attn\\.qkv)",
                         type=list[str], check=module_names)
RANK_ORTHOGONAL = Option(10, "r_o, rank of the orthogonal adapter (also the LoRA rank of the LoRA baselines)",
                         check=positive_int, rank=True)
ENERGY_THRESHOLD_START = Option(0.95, "eps_1 of the GPM energy criterion of the subspace memory", check=energy)
ENERGY_THRESHOLD_END = Option(0.99, "eps_T; eps_t rises linearly in between", check=energy)
STAT_IMAGES = Option(2000, "images per task seen by the statistics passes (a seeded random subset); None = all",
                     type=Optional[int], check=positive_int_or_null)
TAU_ID = Option(0.02, "temperature of the task / class posterior (on squared distances per dimension)",
                check=positive)
GATE_LAYER = Option(2, "gate=shared (duallora) / ncm-gate: features are the mean tokens entering blocks 0..gate_layer; "
                        "residual adapters in blocks >= gate_layer (negative: counted from the last block)")
RIDGE = Option(1e-4, "ridge added to the pooled covariance, relative to its mean eigenvalue")
SHRINKAGE = Option("none", "pooled covariance of the Mahalanobis statistics shrunk toward a scaled identity: none | "
                           "oas (Oracle Approximating Shrinkage, coefficient estimated from the data) | auto (oas "
                           "while it rests on fewer than 2 images per dimension, else none; docs/method.md)",
                   choices=("none", "oas", "auto"))
