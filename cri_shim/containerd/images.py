"""containerd's Images service, typed: the one place its requests are built.

Image records (name → target descriptor, labels) as containerd's CRI plugin
writes them; `images/manager.py` decides what they say.
"""

from __future__ import annotations

from cri_shim.containerd.client import ContainerdClient, metadata_for
from cri_shim.gen.containerd.services.images import v1 as images_v1
from cri_shim.gen.google.protobuf import FieldMask


class Images:
    def __init__(self, client: ContainerdClient) -> None:
        self.client = client

    async def all(self) -> list[images_v1.Image]:
        reply = await self.client.call(
            "Images.List", self.client.images.list(images_v1.ListImagesRequest())
        )
        return list(reply.images)

    async def get(self, name: str) -> images_v1.Image | None:
        reply = await self.client.call(
            "Images.Get", self.client.images.get(images_v1.GetImageRequest(name=name))
        )
        return reply.image

    async def create(self, image: images_v1.Image, *, lease: str | None = None) -> None:
        await self.client.call(
            "Images.Create",
            self.client.images.create(
                images_v1.CreateImageRequest(image=image), metadata=metadata_for(self.client, lease)
            ),
        )

    async def update(
        self, image: images_v1.Image, paths: list[str], *, lease: str | None = None
    ) -> None:
        """Change only the fields named by `paths` (`target`, `labels.<key>`)."""
        await self.client.call(
            "Images.Update",
            self.client.images.update(
                images_v1.UpdateImageRequest(image=image, update_mask=FieldMask(paths=paths)),
                metadata=metadata_for(self.client, lease),
            ),
        )

    async def delete(self, name: str, *, sync: bool = False) -> None:
        """`sync`: return once containerd's GC has run for what the record held."""
        await self.client.call(
            "Images.Delete",
            self.client.images.delete(images_v1.DeleteImageRequest(name=name, sync=sync)),
        )
