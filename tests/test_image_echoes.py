"""WriteEchoes: which image events are the echo of the shim's own writes."""

from __future__ import annotations

import pytest

from cri_shim.images.echoes import WriteEchoes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_write_is_claimed_once_and_strangers_are_not() -> None:
    echoes = WriteEchoes()
    with echoes.expecting("a"):
        pass
    with echoes.expecting("a"):
        pass
    assert not echoes.claim("b")
    assert echoes.claim("a")
    assert echoes.claim("a")
    assert not echoes.claim("a")  # a third event is another writer's
    assert len(echoes) == 0


def test_a_failed_write_expects_nothing() -> None:
    echoes = WriteEchoes()
    with pytest.raises(RuntimeError), echoes.expecting("a"):
        raise RuntimeError("containerd said no")
    assert len(echoes) == 0
    assert not echoes.claim("a")


def test_an_echo_that_never_came_expires() -> None:
    clock = Clock()
    echoes = WriteEchoes(ttl=30, clock=clock)
    with echoes.expecting("a"):
        pass
    clock.now += 31
    assert not echoes.claim("a")


def test_a_delete_or_a_reload_drops_what_was_expected() -> None:
    echoes = WriteEchoes()
    for name in ("a", "b"):
        with echoes.expecting(name):
            pass
    echoes.forget("a")
    assert not echoes.claim("a")
    echoes.clear()
    assert not echoes.claim("b")


def test_expired_expectations_are_swept_when_many_names_wait() -> None:
    clock = Clock()
    echoes = WriteEchoes(ttl=1, clock=clock)
    for i in range(2000):
        with echoes.expecting(f"name-{i}"):
            pass
    clock.now += 2
    with echoes.expecting("fresh"):
        pass
    assert len(echoes) == 1
    assert echoes.claim("fresh")
