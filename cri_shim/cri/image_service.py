"""The CRI ImageService, registered from the start so that clients calling an
image RPC get a proper UNIMPLEMENTED rather than a malformed HTTP/2 answer.
Image handlers are routed here as they land."""

from __future__ import annotations

from cri_shim.gen.runtime import v1 as cri
from cri_shim.instrument import Instrumentation


class ImageService(cri.ImageServiceBase):
    def __init__(self, instrument: Instrumentation) -> None:
        self._call = instrument.unary
