"""The images of the stand-ins: tiny one-colour PNGs whose colour encodes the label.

Every data source writes a tiny copy of its data in its own layout (``DataSource.standin``, next to
its loader in :mod:`duallora.data.sources`); the tests load each one, and
``python benchmarks/standins.py`` (docs/benchmarks.md, "Try every preset here") runs every preset on
them, so that every loader, split rule, record and preset runs end to end on a machine without the
real data.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    """Write a one-colour RGB PNG (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def color(label: int, i: int = 0) -> tuple[int, int, int]:
    """The stand-in colour of image ``i`` of class ``label``."""
    return (40 * label + 20, 10 * i, 200 - 40 * label)
