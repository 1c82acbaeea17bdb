"""Wire bytes kept with the store's records, and responses built from them.

betterproto2 encodes in pure Python (~170 µs per container), so answering
kubelet's relist by re-encoding 1000 unchanged containers every second costs
a core. Records cache their CRI encodings; any assignment to one of their
fields drops the cache (records are only ever changed by assignment), and list
responses are the cached items concatenated as repeated field 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cri_shim.gen.runtime import v1 as cri

# Record attributes that are not reflected in any encoding.
_NOT_ENCODED = frozenset(
    {"lock", "stop_complete", "_list_bytes", "_status_bytes", "_info_bytes", "_info_key"}
)


class EncodingCache:
    """Mixin for store records: memoizes `to_cri()`/`to_status()`, already framed as
    field 1 (where both sit in their responses), until any field is assigned."""

    _list_bytes: bytes | None = None
    _status_bytes: bytes | None = None
    _info_bytes: bytes | None = None  # the verbose `info` map, as field 2 entries
    _info_key: object = None  # what else the info was built from (compared by identity)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name not in _NOT_ENCODED:
            object.__setattr__(self, "_list_bytes", None)
            object.__setattr__(self, "_status_bytes", None)
            object.__setattr__(self, "_info_bytes", None)

    def to_cri(self) -> Any:
        raise NotImplementedError

    def to_status(self) -> Any:
        raise NotImplementedError

    def list_bytes(self) -> bytes:
        """`to_cri()` as one item of a List response's repeated field 1."""
        data = self._list_bytes
        if data is None:
            data = message_field(1, bytes(self.to_cri()))
            object.__setattr__(self, "_list_bytes", data)
        return data

    def status_bytes(self) -> bytes:
        """`to_status()` as the `status` field (1) of a Status response."""
        data = self._status_bytes
        if data is None:
            data = message_field(1, bytes(self.to_status()))
            object.__setattr__(self, "_status_bytes", data)
        return data

    def info_bytes(self, build: Callable[[], Mapping[str, str]], key: object = None) -> bytes:
        """The verbose `info` map `build()` makes, as a Status response's field 2,
        until a field is assigned or `key` (state kept outside the record's fields,
        such as a container's stored spec) is no longer the same object."""
        data = self._info_bytes
        if data is None or self._info_key is not key:
            data = map_field(2, build())
            object.__setattr__(self, "_info_bytes", data)
            object.__setattr__(self, "_info_key", key)
        return data


def varint(value: int) -> bytes:
    """A non-negative integer in protobuf's base-128 form."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def message_field(number: int, data: bytes) -> bytes:
    """A length-delimited field, as betterproto2 writes a message-typed one."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def map_field(number: int, entries: Mapping[str, str]) -> bytes:
    """A map<string, string> field: one entry message (key 1, value 2) per item,
    as betterproto2 writes it."""
    return b"".join(
        message_field(number, message_field(1, key.encode()) + message_field(2, value.encode()))
        for key, value in entries.items()
    )


class _Prebuilt:
    """Serializes to a body assembled beforehand (grpclib's codec calls
    SerializeToString); its Python fields stay empty, so only the wire view counts."""

    _body: bytes = b""

    def __bytes__(self) -> bytes:
        return self._body

    def SerializeToString(self) -> bytes:
        return self._body


class EncodedListContainersResponse(_Prebuilt, cri.ListContainersResponse):
    pass


class EncodedListPodSandboxResponse(_Prebuilt, cri.ListPodSandboxResponse):
    pass


class EncodedContainerStatusResponse(_Prebuilt, cri.ContainerStatusResponse):
    pass


class EncodedPodSandboxStatusResponse(_Prebuilt, cri.PodSandboxStatusResponse):
    pass


def list_containers_response(items: Iterable[EncodingCache]) -> cri.ListContainersResponse:
    response = EncodedListContainersResponse()
    response._body = b"".join([item.list_bytes() for item in items])
    return response


def list_pod_sandbox_response(items: Iterable[EncodingCache]) -> cri.ListPodSandboxResponse:
    response = EncodedListPodSandboxResponse()
    response._body = b"".join([item.list_bytes() for item in items])
    return response


def container_status_response(
    record: EncodingCache, info: bytes = b""
) -> cri.ContainerStatusResponse:
    """status (field 1) from the cache, then the (cached) verbose info map (field 2)."""
    return prebuilt(EncodedContainerStatusResponse, record.status_bytes() + info)


def pod_sandbox_status_response(
    record: EncodingCache, info: bytes = b""
) -> cri.PodSandboxStatusResponse:
    return prebuilt(EncodedPodSandboxStatusResponse, record.status_bytes() + info)


@dataclass
class BatchLimits:
    """Bounds of one Stream* message; grpclib enforces no message size, so we do.
    One object is shared by a shim's handlers (tests narrow it on a live shim)."""

    max_items: int = 5000
    max_bytes: int = 15 * 1024 * 1024


def batches(items: Iterable[bytes], limits: BatchLimits) -> Iterator[bytes]:
    """Join framed items into bodies of at most `limits.max_items` items and
    `limits.max_bytes` bytes. An item larger than the byte budget goes alone (as
    containerd sends it). No items yield nothing: the stream just ends, as
    containerd's does."""
    batch: list[bytes] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= limits.max_items or size + len(item) > limits.max_bytes):
            yield b"".join(batch)
            batch = []
            size = 0
        batch.append(item)
        size += len(item)
    if batch:
        yield b"".join(batch)


def framed(messages: Iterable[Any]) -> Iterator[bytes]:
    """Messages with no cached encoding (stats, images), each framed as field 1 once."""
    for message in messages:
        yield message_field(1, bytes(message))


class EncodedStreamContainersResponse(_Prebuilt, cri.StreamContainersResponse):
    pass


class EncodedStreamPodSandboxesResponse(_Prebuilt, cri.StreamPodSandboxesResponse):
    pass


class EncodedStreamContainerStatsResponse(_Prebuilt, cri.StreamContainerStatsResponse):
    pass


class EncodedStreamPodSandboxStatsResponse(_Prebuilt, cri.StreamPodSandboxStatsResponse):
    pass


class EncodedStreamPodSandboxMetricsResponse(_Prebuilt, cri.StreamPodSandboxMetricsResponse):
    pass


class EncodedListContainerStatsResponse(_Prebuilt, cri.ListContainerStatsResponse):
    pass


class EncodedListPodSandboxStatsResponse(_Prebuilt, cri.ListPodSandboxStatsResponse):
    pass


class EncodedContainerStatsResponse(_Prebuilt, cri.ContainerStatsResponse):
    pass


class EncodedPodSandboxStatsResponse(_Prebuilt, cri.PodSandboxStatsResponse):
    pass


class EncodedListPodSandboxMetricsResponse(_Prebuilt, cri.ListPodSandboxMetricsResponse):
    pass


class EncodedStreamImagesResponse(_Prebuilt, cri.StreamImagesResponse):
    pass


class EncodedListImagesResponse(_Prebuilt, cri.ListImagesResponse):
    pass


class EncodedImageStatusResponse(_Prebuilt, cri.ImageStatusResponse):
    pass


class EncodedStatusResponse(_Prebuilt, cri.StatusResponse):
    pass


_Message = TypeVar("_Message", bound=_Prebuilt)


def prebuilt(cls: type[_Message], body: bytes) -> _Message:
    """A response of `cls` whose wire form is `body` (every Stream* reply's items are field 1)."""
    response = cls()
    response._body = body
    return response
