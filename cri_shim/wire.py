"""Reading protobuf wire bytes for the hot paths, without decoding whole messages.

betterproto2 decodes in pure Python, field by field; a full node's stats round
parsed hundreds of cgroup payloads and task metrics entries with it, most of
whose fields nobody reads. These readers walk one level of the wire form and
keep only the fields asked for, unparsed below it.
"""

from __future__ import annotations

from collections.abc import Iterator


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def scan(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each varint and length-delimited field of one
    message level, in wire order; fixed-width fields are skipped. Raises
    ValueError on a malformed message."""
    i, end = 0, len(data)
    try:
        while i < end:
            key, i = _varint_at(data, i)
            wire = key & 7
            if wire == 0:
                value, i = _varint_at(data, i)
                yield key >> 3, value
                continue
            if wire == 2:
                length, i = _varint_at(data, i)
                if i + length > end:
                    raise ValueError("truncated message")
                yield key >> 3, data[i : i + length]
                i += length
                continue
            if wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if i > end:
                raise ValueError("truncated message")
    except IndexError as err:
        raise ValueError("truncated varint") from err


def read_fields(data: bytes, wanted: frozenset[int]) -> dict[int, int | bytes]:
    """The fields numbered in `wanted`: a varint field's value, a length-delimited
    field's bytes; the last occurrence wins, as in protobuf."""
    return {number: value for number, value in scan(data) if number in wanted}


def repeated_field(data: bytes, number: int) -> list[bytes]:
    """Every occurrence of length-delimited field `number` (a repeated message), in order."""
    found = []
    for field, value in scan(data):
        if field == number:
            if not isinstance(value, bytes):
                raise ValueError(f"field {number} is not length-delimited")
            found.append(value)
    return found


__all__ = ["read_fields", "repeated_field", "scan"]
