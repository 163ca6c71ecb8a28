"""Where adapters sit: the one table of named placements, and PEFT-style module patterns.

``method.adapted_modules`` is a list of entries; each entry is one of

* a **placement name** from this table (:data:`PLACEMENTS`). Built-ins, for timm's
  ``VisionTransformer``: ``qkv`` (``attn.qkv``), ``proj`` (``attn.proj``), ``fc1`` (``mlp.fc1``),
  ``fc2`` (``mlp.fc2``). A name has no dot (``[A-Za-z_][A-Za-z0-9_-]*``); a dotless entry that is
  not registered is refused when the config is loaded;
* a **module path**, dotted identifiers only, matched like an entry of PEFT's ``target_modules``
  list: the exact path (``blocks.3.attn.qkv``) or a suffix at a dot (``attn.qkv`` matches
  ``blocks.3.attn.qkv`` in every block, ``mlp.fc2`` every ``mlp.fc2``);
* a **regular expression** (any other entry, e.g. ``blocks\\.[0-5]\\.attn\\.qkv``), which must match
  a whole path (``re.fullmatch``, as PEFT does for a string ``target_modules``).

Paths are those of ``backbone.named_modules()`` (``blocks.{i}.<path inside block i>``), at any depth
inside a block. Only ``nn.Linear`` layers inside ``backbone.blocks`` can carry adapters: an entry
that matches none of them is a :class:`~duallora.errors.ConfigError` naming the placement names and
real linear paths of the model. The layers of all entries together are adapted once each, in forward
order (block by block, then module-registration order inside the block), whatever the order of the
entries. The block index of each layer comes from walking ``backbone.blocks``
(:func:`find_layers`), never from parsing a name.

A new named placement is one call (or one ``register_placement`` line next to the code that needs
it), before ``load_config``::

    from duallora.placements import register_placement
    register_placement("attn_out", "attn.proj", help="attention output projection")
    # method.adapted_modules=[qkv,attn_out] now works
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

from torch import nn

from duallora.errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)+")


@dataclass(frozen=True)
class Placement:
    """A named set of layers: the module paths or regular expressions that find them.

    Attributes:
        name: what ``method.adapted_modules`` calls it (no dot).
        patterns: module paths (exact or suffix) or regular expressions, see the module docstring.
        help: one line for the docs and error messages.
    """

    name: str
    patterns: tuple[str, ...]
    help: str = ""


_PLACEMENTS: dict[str, Placement] = {}

#: Read-only live view of the table, ``{name: Placement}`` in registration order.
PLACEMENTS: Mapping[str, Placement] = MappingProxyType(_PLACEMENTS)


def entry_kind(entry: str) -> str:
    """``"name"`` (no dot: a placement name), ``"path"`` (dotted identifiers: exact or suffix match) or
    ``"regex"`` (anything else: full match)."""
    if _NAME.fullmatch(entry):
        return "name"
    if _PATH.fullmatch(entry):
        return "path"
    return "regex"


def _pattern_error(pattern: str) -> Optional[str]:
    """Why ``pattern`` cannot find modules (a dotless name, a bad regular expression), or None."""
    kind = entry_kind(pattern)
    if kind == "name":
        return f"'{pattern}' is a name, not a module path or regular expression"
    if kind == "regex":
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"'{pattern}' is not a valid regular expression ({exc})"
    return None


def register_placement(name: str, *patterns: str, help: str = "") -> Placement:
    """Make ``name`` usable in ``method.adapted_modules``; it adapts the layers ``patterns`` find.

    Raises:
        ValueError: a name that is not ``[A-Za-z_][A-Za-z0-9_-]*`` or already registered, no pattern,
            or a pattern that is a dotless name or an invalid regular expression.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"placement name {name!r} must match [A-Za-z_][A-Za-z0-9_-]* (no dot)")
    if name in _PLACEMENTS:
        raise ValueError(f"a placement named {name!r} is already registered ({_PLACEMENTS[name].patterns})")
    if not patterns:
        raise ValueError(f"placement {name!r} needs at least one module path or regular expression")
    for p in patterns:
        message = _pattern_error(p) if isinstance(p, str) else f"{p!r} is not a string"
        if message:
            raise ValueError(f"placement {name!r}: {message}")
    placement = Placement(name, tuple(patterns), help)
    _PLACEMENTS[name] = placement
    return placement


def unregister_placement(name: str) -> Placement:
    """Remove a registered placement (tests and plugins); returns it.

    Raises:
        ConfigError: no placement of that name.
    """
    if name not in _PLACEMENTS:
        raise ConfigError(f"no placement named {name!r}; registered: {', '.join(_PLACEMENTS)}")
    return _PLACEMENTS.pop(name)


def placement_names() -> tuple[str, ...]:
    """Registered placement names, in registration order (the built-ins first)."""
    return tuple(_PLACEMENTS)


def entry_error(entry: object) -> Optional[str]:
    """Why ``entry`` cannot be a ``method.adapted_modules`` entry (before a model is known), or None."""
    if not isinstance(entry, str) or not entry:
        return f"{entry!r} is not a placement name, module path or regular expression"
    if entry_kind(entry) == "name":
        if entry in _PLACEMENTS:
            return None
        return (f"'{entry}' is not a placement name (registered: {', '.join(_PLACEMENTS)}); name a layer by "
                f"its module path (e.g. attn.qkv, blocks.0.mlp.fc1) or a regular expression")
    return _pattern_error(entry)


def patterns_of(entry: str) -> tuple[str, ...]:
    """The module paths / regular expressions an entry stands for (a placement's, or itself)."""
    return _PLACEMENTS[entry].patterns if entry_kind(entry) == "name" else (entry,)


def path_matches(pattern: str, path: str) -> bool:
    """PEFT's rule: a dotted path matches exactly or as a suffix at a dot; a regex must match all of ``path``."""
    if entry_kind(pattern) == "path":
        return path == pattern or path.endswith("." + pattern)
    return re.fullmatch(pattern, path) is not None


class LayerMatch(NamedTuple):
    """One layer an adapter can sit on: ``block`` (index in ``backbone.blocks``), ``path`` (its module
    path in the backbone, e.g. ``blocks.3.attn.qkv``) and the ``module`` itself."""

    block: int
    path: str
    module: nn.Module


def _walk(module: nn.Module, prefix: str, leaf: tuple[type, ...]) -> Iterable[tuple[str, nn.Module]]:
    """``named_modules`` order, without descending into ``leaf`` types (an already adapted layer)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        yield path, child
        if not isinstance(child, leaf):
            yield from _walk(child, path, leaf)


def find_layers(blocks: Sequence[nn.Module], entries: Sequence[str], prefix: str = "blocks",
                leaf: tuple[type, ...] = ()) -> list[LayerMatch]:
    """The linear layers inside ``blocks`` that ``entries`` name, each once, in forward order.

    Args:
        blocks: the backbone's blocks (``backbone.blocks``); module paths are ``{prefix}.{i}.<path>``.
        entries: ``method.adapted_modules`` entries (placement names, module paths, regexes).
        prefix: the blocks' own path in the backbone.
        leaf: module types not searched inside and matched as layers (``AdaptedLinear``: a backbone
            wrapped before; its inner ``base`` is not a separate layer).

    Raises:
        ConfigError: an entry that is not valid (:func:`entry_error`), or that matches no linear layer;
            the message names the placement names and real linear-layer paths.
    """
    for entry in entries:
        message = entry_error(entry)
        if message:
            raise ConfigError(f"method.adapted_modules: {message}")
    kinds = (nn.Linear,) + tuple(leaf)
    modules = [(i, path, m) for i, block in enumerate(blocks)
               for path, m in _walk(block, f"{prefix}.{i}", tuple(leaf))]
    linear = [(i, path, m) for i, path, m in modules if isinstance(m, kinds)]
    chosen: set[str] = set()
    for entry in dict.fromkeys(entries):
        patterns = patterns_of(entry)
        hits = [path for _, path, _ in linear if any(path_matches(p, path) for p in patterns)]
        if not hits:
            raise ConfigError(_no_match_message(entry, patterns, modules, linear, len(blocks), prefix))
        chosen.update(hits)
    return [LayerMatch(i, path, m) for i, path, m in linear if path in chosen]


def _no_match_message(entry: str, patterns: tuple[str, ...], modules: list, linear: list, depth: int,
                      prefix: str) -> str:
    what = f"'{entry}'" + (f" (placement {', '.join(patterns)})" if patterns != (entry,) else "")
    other = [f"{path} ({type(m).__name__})" for _, path, m in modules
             if any(path_matches(p, path) for p in patterns)]
    first = [path for i, path, _ in linear if i == 0]
    others = "" if depth < 2 else f" (likewise in {prefix}.1)" if depth == 2 else \
        f" (likewise in {prefix}.1 to {prefix}.{depth - 1})"
    example = f"linear layers of block 0: {', '.join(first)}{others}" if first else \
        f"the backbone's {depth} blocks hold no linear layer"
    return (f"method.adapted_modules entry {what} matches no linear layer of the backbone's blocks"
            + (f"; it matches only {', '.join(other[:4])}{', ...' if len(other) > 4 else ''}, not nn.Linear"
               if other else "")
            + f". Placement names: {', '.join(_PLACEMENTS)}; {example}. Paths match exactly or as a suffix "
              f"(attn.qkv), any other entry as a regular expression of the whole path")


# ------------------------------------------------------------------ built-ins: timm's VisionTransformer
register_placement("qkv", "attn.qkv", help="fused query/key/value projection of the attention")
register_placement("proj", "attn.proj", help="output projection of the attention")
register_placement("fc1", "mlp.fc1", help="first linear layer of the MLP")
register_placement("fc2", "mlp.fc2", help="second linear layer of the MLP")
