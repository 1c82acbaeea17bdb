"""Which pod and container annotations reach the OCI spec.

What a pod author writes must not pass for the runtime's own annotations
(`io.kubernetes.cri.sandbox-id` picks the containerd-shim a pause process
joins) nor reach runc as `org.systemd.property.*` unit properties. As in
containerd's CRI, an annotation is copied into the spec only when its key
matches one of the runtime handler's `pod_annotations` (or, for a
container's own annotations, `container_annotations`) patterns, and the
runtime's keys are set afterwards, so they always win.

Patterns are Go's `path.Match` globs, as containerd uses: `*` and `?` do not
match `/`, `[...]` classes (`^` or `!` negates), `\\` escapes; a malformed
pattern matches nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str] | None:
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\":
            index += 1
            if index == len(pattern):
                return None
            out.append(re.escape(pattern[index]))
        elif char == "[":
            end = pattern.find("]", index + 2)
            if end < 0:
                return None
            body = pattern[index + 1 : end]
            negate = body[:1] in ("^", "!")
            body = body[1:] if negate else body
            if not body:
                return None
            escaped = "".join("\\" + c if c in "\\]^[" else c for c in body)
            out.append(f"[{'^/' if negate else ''}{escaped}]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    try:
        return re.compile("".join(out))
    except re.error:
        return None


def glob_match(pattern: str, key: str) -> bool:
    """Go's `path.Match(pattern, key)`, a malformed pattern matching nothing."""
    regex = _glob_regex(pattern)
    return regex is not None and regex.fullmatch(key) is not None


def passthrough(annotations: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """The annotations whose key matches one of the `allowed` patterns."""
    patterns = tuple(allowed)
    if not patterns:
        return {}
    return {
        key: value
        for key, value in annotations.items()
        if any(glob_match(pattern, key) for pattern in patterns)
    }


__all__ = ["glob_match", "passthrough"]
