"""The built-in data sources, one module each; importing this package registers them (in this order).

=================  ==========================================================================
``mnist``          :mod:`~duallora.data.sources.idx` (IDX files)
``fashion-mnist``  :mod:`~duallora.data.sources.idx`
``imagefolder``    :mod:`~duallora.data.sources.imagefolder` (class folders)
``cifar100``       :mod:`~duallora.data.sources.cifar100`
``imagenet-r``     :mod:`~duallora.data.sources.wnid` (WordNet-id folders)
``imagenet-a``     :mod:`~duallora.data.sources.wnid`
``domainnet``      :mod:`~duallora.data.sources.domainnet`
``cub200``         :mod:`~duallora.data.sources.cub200`
``tiny-imagenet``  :mod:`~duallora.data.sources.tiny_imagenet` (zip or folder)
=================  ==========================================================================

Another source is added by registering it (:func:`~duallora.data.registry.register_source`).
"""

# The import order is the registration order, which is the order of the data.dataset choices.
# ruff: noqa: I001
from duallora.data.registry import get_source, register_source, source_names
from duallora.data.sources import idx, imagefolder
from duallora.data.sources import cifar100, wnid, domainnet, cub200
from duallora.data.sources import tiny_imagenet

__all__ = ["cifar100", "cub200", "domainnet", "get_source", "idx", "imagefolder", "register_source",
           "source_names", "tiny_imagenet", "wnid"]
