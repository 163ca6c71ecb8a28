"""The method registry: ``method.name`` -> method class, and every method's declared options.

Built-in methods register when :mod:`duallora.methods` is imported; a new method registers with the
class decorator::

    @register_method
    class NearestMean(ContinualMethod):
        name = "nearest-mean"
        options = {"tau_id": TAU_ID}
        ...

:mod:`duallora.config` derives ``MethodConfig``, the allowed ``method.name`` values, the per-option
choices and ``METHOD_KEYS`` from here, and rebuilds them whenever the registry changes (:func:`add_listener`),
so a method registered after the config module was imported is accepted by ``load_config``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from duallora.errors import ConfigError
from duallora.methods.base import ContinualMethod
from duallora.methods.options import Option, check_option_name
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig

_REGISTRY: dict[str, type[ContinualMethod]] = {}
_LISTENERS: list[Callable[[], None]] = []

#: Read-only live view of the registry, ``{name: class}`` in registration order.
METHODS: Mapping[str, type[ContinualMethod]] = MappingProxyType(_REGISTRY)


def register_method(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator: make ``cls`` selectable as ``method.name=cls.name``; returns ``cls``.

    Checks, so that a broken declaration fails at import and not in the middle of a run:

    * ``cls`` subclasses :class:`ContinualMethod` and its ``name`` is a new, non-empty string;
    * ``options`` maps identifiers (not ``name``) to :class:`Option`; a key another registered method
      declares too must agree with it on default, type and choices;
    * ``uses_adapters`` is True exactly when ``adapted_modules`` is among the options;
    * ``option_defaults`` names only keys among ``options``, each value one of the option's
      ``choices`` (if it has any).

    Raises:
        TypeError: ``cls`` is not a ContinualMethod subclass or an option is not an ``Option``.
        ValueError: a duplicate or invalid name, a bad option key, a conflicting declaration, or
            ``uses_adapters`` inconsistent with the options.
    """
    if not (isinstance(cls, type) and issubclass(cls, ContinualMethod)):
        raise TypeError(f"register_method needs a ContinualMethod subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name or name == ContinualMethod.name:
        raise ValueError(f"{cls.__name__} must set its own class attribute name (the method.name value)")
    if name in _REGISTRY:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    known = all_options()
    for key, opt in cls.options.items():
        check_option_name(key)
        if not isinstance(opt, Option):
            raise TypeError(f"{cls.__name__}.options[{key!r}] must be an Option, got {type(opt).__name__}")
        if key in known and known[key].signature() != opt.signature():
            owner = next(n for n, m in _REGISTRY.items() if key in m.options)
            raise ValueError(
                f"{cls.__name__} declares method.{key} as default={opt.default!r}, type={opt.type!r}, "
                f"choices={opt.choices}, but {owner!r} declares it as default={known[key].default!r}, "
                f"type={known[key].type!r}, choices={known[key].choices}; share one declaration"
            )
    for key, value in cls.option_defaults.items():
        if key not in cls.options:
            raise ValueError(f"{cls.__name__}.option_defaults sets {key!r}, which is not among its options")
        if cls.options[key].choices and value not in cls.options[key].choices:
            raise ValueError(f"{cls.__name__}.option_defaults[{key!r}]={value!r} is not one of "
                             f"{cls.options[key].choices}")
    if cls.uses_adapters != ("adapted_modules" in cls.options):
        raise ValueError(f"{cls.__name__}: uses_adapters={cls.uses_adapters} but adapted_modules is "
                         f"{'not ' if cls.uses_adapters else ''}among its options; a method that uses adapters "
                         "reads method.adapted_modules (methods.options.ADAPTED_MODULES), one that does not must not")
    _REGISTRY[name] = cls
    _changed()
    return cls


def unregister_method(name: str) -> type[ContinualMethod]:
    """Remove a registered method (tests and plugins that registered one); returns its class.

    Raises:
        ConfigError: no method of that name.
    """
    cls = get_method(name)
    del _REGISTRY[name]
    _changed()
    return cls


def get_method(name: str) -> type[ContinualMethod]:
    """The class registered as ``name``.

    Raises:
        ConfigError: unknown name (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method.name={name!r} is not supported; choose one of {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def method_options(name: str) -> Mapping[str, Option]:
    """The options method ``name`` reads, ``{key: Option}`` (read-only).

    Raises:
        ConfigError: unknown name.
    """
    return MappingProxyType(get_method(name).options)


def method_defaults(name: str) -> dict[str, Any]:
    """The defaults method ``name`` gets for the options it reads: ``{key: value}``, the option's
    declared default unless the method's ``option_defaults`` gives its own.

    Raises:
        ConfigError: unknown name.
    """
    cls = get_method(name)
    return {key: cls.option_defaults.get(key, opt.default) for key, opt in cls.options.items()}


def all_options() -> dict[str, Option]:
    """The union of every registered method's options: first declaration wins the position, so
    keys come in registration order, each method's in its declaration order."""
    out: dict[str, Option] = {}
    for cls in _REGISTRY.values():
        for key, opt in cls.options.items():
            out.setdefault(key, opt)
    return out


def add_listener(callback: Callable[[], None]) -> None:
    """Call ``callback()`` after every later (un)registration (``duallora.config`` rebuilds
    ``MethodConfig`` with it)."""
    _LISTENERS.append(callback)


def _changed() -> None:
    for callback in _LISTENERS:
        callback()


def build_method(model: AdaptedViT, cfg: MethodConfig | Any, seed: int = 0) -> ContinualMethod:
    """Instantiate the method named ``cfg.name`` on ``model``.

    Raises:
        ConfigError: unknown name (the config validation rejects it earlier with the same message),
            or what the method's constructor raises for a config that does not fit the backbone.
    """
    return get_method(cfg.name)(model, cfg, seed)
