"""The containerd side of the CRI ImageService.

`cri_shim.registry` fetches; this package writes what it fetches into
containerd's content store under a lease, unpacks layers onto the overlayfs
snapshotter, keeps containerd's image records the way its CRI plugin does, and
answers image queries from an in-memory store loaded from containerd.
"""

from cri_shim.images.manager import ImageManager
from cri_shim.images.store import ImageRecord, ImageStore

__all__ = ["ImageManager", "ImageRecord", "ImageStore"]
