"""The CRI ImageService: each RPC routed, through the instrumented wrapper,
to the image handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cri_shim.cri.image import ImageHandlers
from cri_shim.gen.runtime import v1 as cri
from cri_shim.instrument import Instrumentation


class ImageService(cri.ImageServiceBase):
    def __init__(self, instrument: Instrumentation, images: ImageHandlers) -> None:
        self._call = instrument.unary
        self._stream = instrument.server_stream
        self._images = images

    async def list_images(self, message: cri.ListImagesRequest) -> cri.ListImagesResponse:
        return await self._call("ListImages", self._images.list_images, message)

    async def stream_images(
        self, message: cri.StreamImagesRequest
    ) -> AsyncIterator[cri.StreamImagesResponse]:
        async for batch in self._stream("StreamImages", self._images.stream_images, message):
            yield batch

    async def image_status(self, message: cri.ImageStatusRequest) -> cri.ImageStatusResponse:
        return await self._call("ImageStatus", self._images.image_status, message)

    async def pull_image(self, message: cri.PullImageRequest) -> cri.PullImageResponse:
        return await self._call("PullImage", self._images.pull_image, message)

    async def remove_image(self, message: cri.RemoveImageRequest) -> cri.RemoveImageResponse:
        return await self._call("RemoveImage", self._images.remove_image, message)

    async def image_fs_info(self, message: cri.ImageFsInfoRequest) -> cri.ImageFsInfoResponse:
        return await self._call("ImageFsInfo", self._images.image_fs_info, message)
