"""``domainnet``: DomainNet (cleaned version), 345 classes in six domains, 409,832 / 176,743 images.

Split: DomainNet's own ``<domain>_train.txt`` / ``<domain>_test.txt`` lists of all six domains,
class-incremental over the 345 classes (each task holds its classes' images of every domain), as
InfLoRA does; or the lists given by ``data.split_train`` / ``data.split_test``. Label ids are the
lists' labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from duallora.data.benchmarks import BenchmarkSource, BenchmarkSpec, Index
from duallora.data.registry import StandIn, register_source
from duallora.data.standins import color, png

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

_DOMAINNET_LAYOUT = """domainnet expects DomainNet (cleaned version) in data.root: the six domain folders
and DomainNet's own split lists
  ROOT/clipart/aircraft_carrier/clipart_001_000001.jpg ...  (also infograph, painting, quickdraw,
                                                             real, sketch; 345 class folders each)
  ROOT/clipart_train.txt, ROOT/clipart_test.txt, ...         lines "clipart/aircraft_carrier/... 0"
or other lists given explicitly: data.split_train=[FILE,...] data.split_test=[FILE,...] (text lists
"<path> <label>", or YAML `data:`/`targets:` such as InfLoRA's domainnet_train.yaml)."""


def make_domainnet(root: Path, n_classes: int = 3, n_train: int = 2, n_test: int = 1,
                   domains: tuple[str, ...] = DOMAINNET_DOMAINS) -> list[str]:
    """A stand-in: ROOT/<domain>/<class>/<domain>_<c>_<i>.png and ROOT/<domain>_{train,test}.txt."""
    classes = ["aircraft_carrier", "airplane", "zebra", "The_Eiffel_Tower"][:n_classes]
    label_of = {c: i for i, c in enumerate(sorted(classes, key=str.lower))}  # DomainNet: alphabetical ids
    for d in domains:
        for split, rng in (("train", range(n_train)), ("test", range(n_train, n_train + n_test))):
            lines = []
            for c in classes:
                for i in rng:
                    rel = f"{d}/{c}/{d}_{label_of[c]:03d}_{i:06d}.png"
                    png(root / rel, color(label_of[c], i))
                    lines.append(f"{rel} {label_of[c]}")
            (root / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
    return classes


@register_source("domainnet")
class DomainNet(BenchmarkSource):
    description = "DomainNet, all six domains (its own <domain>_train/test.txt lists, or data.split_train/test)"
    split_lists = True
    spec = BenchmarkSpec(
        "domainnet", 345, 409_832, 176_743, 586_575, ("official",), (5,), _DOMAINNET_LAYOUT,
        "http://ai.bu.edu/M3SDA/ (cleaned version: <domain>.zip, <domain>_train.txt, <domain>_test.txt)",
    )

    def build_index(self, root: Optional[str], split_train: list[str], split_test: list[str], seed: int,
                    test_fraction: float) -> Index:
        base = self.need_root(root)
        if split_train or split_test:
            return self.index_from_given_lists(base, split_train, split_test)
        present = {d: ((base / f"{d}_train.txt").is_file(), (base / f"{d}_test.txt").is_file())
                   for d in DOMAINNET_DOMAINS}
        missing = [f"{d}_{s}.txt" for d, (tr, te) in present.items() for s, ok in (("train", tr), ("test", te))
                   if not ok]
        if missing:
            raise self.layout_error(f"data.root={str(base)!r} lacks DomainNet's split lists {missing}; put them "
                                    "there or pass data.split_train/data.split_test")
        return self.index_from_lists(
            base, [str(base / f"{d}_train.txt") for d in DOMAINNET_DOMAINS],
            [str(base / f"{d}_test.txt") for d in DOMAINNET_DOMAINS], "official",
            "DomainNet's <domain>_train.txt / <domain>_test.txt, all six domains",
        )

    def standin(self, folder: Path) -> StandIn:
        make_domainnet(folder, n_classes=4, n_train=2, n_test=1)
        return StandIn(folder, num_classes=4, train=6 * 4 * 2, test=6 * 4 * 1)
