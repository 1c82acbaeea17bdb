"""Image references normalise exactly as Docker / containerd do (distribution/reference)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cri_shim.registry.reference import (
    Reference,
    ReferenceError,
    is_digest_id,
    parse_reference,
)

D = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "normalised", "domain", "path", "tag", "digest"),
    [
        (
            "busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            "latest",
            None,
        ),
        (
            "busybox:1.36",
            "docker.io/library/busybox:1.36",
            "docker.io",
            "library/busybox",
            "1.36",
            None,
        ),
        (
            "library/busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            "latest",
            None,
        ),
        (
            "docker.io/busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            "latest",
            None,
        ),
        (
            "index.docker.io/busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            "latest",
            None,
        ),
        (
            "docker.io/library/busybox:latest",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            "latest",
            None,
        ),
        ("foo/bar", "docker.io/foo/bar:latest", "docker.io", "foo/bar", "latest", None),
        ("foo/bar/baz:v1", "docker.io/foo/bar/baz:v1", "docker.io", "foo/bar/baz", "v1", None),
        ("localhost/foo", "localhost/foo:latest", "localhost", "foo", "latest", None),
        ("localhost:5000/x", "localhost:5000/x:latest", "localhost:5000", "x", "latest", None),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", None),
        ("[::1]:5000/foo", "[::1]:5000/foo:latest", "[::1]:5000", "foo", "latest", None),
        (
            "registry.k8s.io/pause:3.9",
            "registry.k8s.io/pause:3.9",
            "registry.k8s.io",
            "pause",
            "3.9",
            None,
        ),
        (
            "gcr.io/k8s-staging-cri-tools/test-image-tags:1",
            "gcr.io/k8s-staging-cri-tools/test-image-tags:1",
            "gcr.io",
            "k8s-staging-cri-tools/test-image-tags",
            "1",
            None,
        ),
        (f"a/b@{D}", f"docker.io/a/b@{D}", "docker.io", "a/b", None, D),
        (f"busybox@{D}", f"docker.io/library/busybox@{D}", "docker.io", "library/busybox", None, D),
        (
            f"busybox:1@{D}",
            f"docker.io/library/busybox:1@{D}",
            "docker.io",
            "library/busybox",
            "1",
            D,
        ),
        (
            f"quay.io:443/team/app_v2:v1.2.3-rc.1@{D}",
            f"quay.io:443/team/app_v2:v1.2.3-rc.1@{D}",
            "quay.io:443",
            "team/app_v2",
            "v1.2.3-rc.1",
            D,
        ),
        # Separators: '.', '_', '__' and runs of '-'.
        (
            "a__b/c--d/e.f",
            "docker.io/a__b/c--d/e.f:latest",
            "docker.io",
            "a__b/c--d/e.f",
            "latest",
            None,
        ),
        # A capitalised first component is taken as a registry host (distribution v3).
        ("Foo/bar", "Foo/bar:latest", "Foo", "bar", "latest", None),
        (
            "busybox:Latest_1",
            "docker.io/library/busybox:Latest_1",
            "docker.io",
            "library/busybox",
            "Latest_1",
            None,
        ),
        (
            "sha256:" + "0" * 64,
            "docker.io/library/sha256:" + "0" * 64,
            "docker.io",
            "library/sha256",
            "0" * 64,
            None,
        ),
    ],
)
def test_normalisation(
    text: str, normalised: str, domain: str, path: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert str(ref) == normalised
    assert ref.repository == f"{domain}/{path}"
    # Normalising is idempotent.
    assert parse_reference(str(ref)) == ref


def test_with_digest_drops_the_tag() -> None:
    ref = parse_reference("busybox:1.36")
    pinned = ref.with_digest(D)
    assert pinned == Reference("docker.io", "library/busybox", None, D)
    assert str(pinned) == f"docker.io/library/busybox@{D}"
    assert ref.object == "1.36" and pinned.object == D


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty reference"),
        ("Foo:bar", "repository name 'library/Foo' must be lowercase"),
        ("example.com/Foo", "repository name 'Foo' must be lowercase"),
        ("busybox:", "invalid tag ''"),
        ("busybox:-x", "invalid tag '-x'"),
        ("busybox:.x", "invalid tag '.x'"),
        ("busybox:" + "a" * 129, "invalid tag"),
        ("busybox:a/b", "invalid registry host 'busybox:a'"),
        ("a/b@sha256:abc", "invalid digest 'sha256:abc'"),
        ("a/b@sha256:" + "A" * 64, "sha256 needs 64 lowercase hex digits"),
        ("a/b@sha256:" + "0" * 63, "sha256 needs 64 lowercase hex digits"),
        ("a/b@sha256:" + "0" * 63 + "g", "invalid digest"),
        ("a/b@md5:" + "0" * 32, "unsupported digest algorithm 'md5'"),
        ("a/b@", "invalid digest ''"),
        ("0" * 64, "image id, not a name"),
        ("x/" + "a" * 250, "must not be longer than 255 characters"),
        ("a//b", "invalid repository path component ''"),
        ("a/-b", "invalid repository path component '-b'"),
        ("a/b_", "invalid repository path component 'b_'"),
        ("a/b___c", "invalid repository path component 'b___c'"),
        (" busybox", "whitespace"),
        ("busy box", "whitespace"),
        ("http://foo/bar", "invalid registry host 'http:'"),
        ("-bad.host/x", "invalid registry host '-bad.host'"),
        (f"@{D}", "no repository name"),
        (":tag", "no repository name"),
    ],
)
def test_invalid_references(text: str, reason: str) -> None:
    with pytest.raises(ReferenceError) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert message.startswith(f"invalid image reference {text!r}: ")
    assert reason in message
    assert isinstance(caught.value, ValueError)


def test_name_length_limit_counts_the_normalised_name() -> None:
    # docker.io/ + path of 245 = 255 characters: the longest name accepted.
    path = "x/" + "a" * 243
    assert len(parse_reference(f"docker.io/{path}").repository) == 255
    with pytest.raises(ReferenceError):
        parse_reference(f"docker.io/{path}a")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sha256:" + "0" * 64, True),
        (D, True),
        ("sha256:" + "0" * 63, False),
        ("sha256:" + "A" * 64, False),
        ("sha512:" + "0" * 128, False),
        ("0" * 64, False),
        ("busybox", False),
        (f"busybox@{D}", False),
    ],
)
def test_is_digest_id(text: str, expected: bool) -> None:
    assert is_digest_id(text) is expected


# No '.' in components: a dotted first component would (rightly) become the registry host.
_component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:_|__|-+)[a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(
    domain=st.sampled_from(["", "docker.io/", "localhost:5000/", "registry.k8s.io/", "10.0.0.1/"]),
    components=st.lists(_component, min_size=1, max_size=3),
    tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    digest=st.one_of(st.none(), st.just(D)),
)
def test_normalised_form_is_a_fixed_point(
    domain: str, components: list[str], tag: str | None, digest: str | None
) -> None:
    text = domain + "/".join(components)
    if tag is not None:
        text += f":{tag}"
    if digest is not None:
        text += f"@{digest}"
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    assert ref.tag == (tag if tag is not None else (None if digest else "latest"))
    assert ref.digest == digest
    assert ref.path.endswith("/".join(components))
