import re

from cri_shim.container.cri_log import LineSplitter, rfc3339_nano

ENTRY = re.compile(rb"^(\S+) (stdout|stderr) ([FP]) (.*)$", re.S)


def parse(entry: bytes) -> tuple[bytes, bytes, bytes]:
    match = ENTRY.match(entry.rstrip(b"\n"))
    assert match, entry
    return match.group(2), match.group(3), match.group(4)


def test_timestamp_is_rfc3339_nano_without_trailing_zeros() -> None:
    assert rfc3339_nano(1_475_713_029_669_794_202) == b"2016-10-06T00:17:09.669794202Z"
    assert rfc3339_nano(1_475_713_029_500_000_000) == b"2016-10-06T00:17:09.5Z"
    assert rfc3339_nano(1_475_713_029_000_000_000) == b"2016-10-06T00:17:09Z"


def test_lines_split_across_chunks_are_joined() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"hel") == []
    entries = splitter.feed(b"lo\nwor")
    assert [parse(e) for e in entries] == [(b"stdout", b"F", b"hello")]
    entries = splitter.feed(b"ld\n\n")
    assert [parse(e) for e in entries] == [(b"stdout", b"F", b"world"), (b"stdout", b"F", b"")]


def test_long_lines_become_partials_then_a_full_end() -> None:
    splitter = LineSplitter("stderr", max_line=4)
    entries = splitter.feed(b"abcdefghij\n")
    assert [parse(e) for e in entries] == [
        (b"stderr", b"P", b"abcd"),
        (b"stderr", b"P", b"efgh"),
        (b"stderr", b"F", b"ij"),
    ]


def test_unterminated_tail_is_flushed_as_partial() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"no newline") == []
    assert [parse(e) for e in splitter.close()] == [(b"stdout", b"P", b"no newline")]
    assert splitter.close() == []
