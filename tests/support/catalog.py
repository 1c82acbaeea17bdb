"""The named test images the project serves, and the registries serving them.

Two groups:

* our own small images on the ``local`` registry (``library/busybox:latest``,
  ``test/multilayer:1``...), plus ``private/busybox:latest`` behind basic auth
  (``auth`` registry, catalog name ``auth/private/busybox:latest``) and behind
  bearer tokens (``token`` registry, ``token/private/busybox:latest``);
* stand-ins for every image critest v1.36 pulls, mirrored under their real
  repository paths.

Mirror scheme: a registry mirror keeps the repository path and only swaps the
host (containerd's ``hosts.toml``, CRI-O's ``registries.conf``), so each
upstream host gets its own ``docker-registry`` process holding that host's
repositories under their original paths::

    registry.k8s.io/e2e-test-images/busybox:1.29-2 -> 127.0.0.1:P1/e2e-test-images/busybox:1.29-2
    gcr.io/k8s-staging-cri-tools/test-image-1:latest
                                   -> 127.0.0.1:P2/k8s-staging-cri-tools/test-image-1:latest
    k8s.gcr.io/pause:3.9                            -> 127.0.0.1:P3/pause:3.9
    public.ecr.aws/docker/library/busybox:1         -> 127.0.0.1:P4/docker/library/busybox:1

:attr:`ServedCatalog.mirrors` maps upstream host -> ``http://127.0.0.1:PORT``.

critest's ``test-image-digest@sha256:9700f9a2...`` cannot be reproduced (it is
the digest of Google's build), so "public image with digest should be pulled and
removed" must be skipped; the image is still served by tag.

Run ``python -m tests.support.catalog serve --state-dir DIR`` to keep the
registries up (CI, critest): it writes ``DIR/catalog.json`` and containerd-style
``DIR/certs.d/<host>/hosts.toml`` once everything is pushed, and runs until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from . import images as im
from .images import AnyImage, Image, ImageIndex, Platform
from .registry import AuthMode, Registry

LOCAL = "local"
AUTH = "auth"
TOKEN = "token"
UPSTREAMS = ("registry.k8s.io", "gcr.io", "k8s.gcr.io", "public.ecr.aws")
CRI_TOOLS = "k8s-staging-cri-tools"
E2E = "e2e-test-images"

#: Credentials of the ``auth`` and ``token`` registries.
USERNAME = "cri-shim"
PASSWORD = "s3cret-test-password"


@dataclass(frozen=True)
class CatalogImage:
    """One repository of the catalog with the tags pointing at ``build()``'s image."""

    registry: str  # an upstream host, or LOCAL / AUTH / TOKEN
    repo: str
    tags: tuple[str, ...]
    build: Callable[[], AnyImage]

    def names(self) -> list[str]:
        """Logical names: ``repo:tag`` on LOCAL, else ``<registry key>/repo:tag`` (for
        mirrored images that is the real upstream reference)."""
        prefix = "" if self.registry == LOCAL else f"{self.registry}/"
        return [f"{prefix}{self.repo}:{t}" for t in self.tags]


# ------------------------------------------------------------------------- builders


def _foreign() -> Platform:
    return (
        Platform("amd64")
        if Platform.host().architecture != "amd64"
        else Platform("arm64", variant="v8")
    )


def _listed(build: Callable[[], Image], media: im.MediaKind = "docker") -> Callable[[], ImageIndex]:
    """Wrap a host image in a manifest list with a foreign-arch entry first, as
    multi-arch upstream images are."""

    def make() -> ImageIndex:
        host = build()
        foreign = im.platform_image(_foreign(), media=media)
        return im.build_index([foreign, host], media=media)

    return make


def _with_file(name: str, media: im.MediaKind = "docker") -> Callable[[], Image]:
    """critest's images/image-test: busybox + ``ADD ${TEST} ${TEST}`` (an empty file)."""
    return lambda: im.busybox_image(
        media=media, extra_layers=[im.layer([im.file(name)], created_by=f"ADD {name} {name}")]
    )


def _user(user: str) -> Callable[[], Image]:
    return lambda: im.user_image(user, media="docker")


def _predefined_group() -> Image:
    """critest's images/image-predefined-group: default-user(1000) in group 50000, USER 1000."""
    passwd = [p for p in im.DEFAULT_PASSWD if not p.startswith("www:")]
    passwd.insert(-1, "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh")
    group = [g for g in im.DEFAULT_GROUP if not g.startswith("www:")]
    group[-1:-1] = ["default-user:x:1000:", "group-defined-in-image:x:50000:default-user"]
    users = im.layer(
        [*im.users_entries(passwd, group), im.directory("home/default-user", uid=1000, gid=1000)],
        created_by="RUN adduser -u 1000 -D default-user && addgroup -g 50000 ...",
    )
    return im.busybox_image(
        media="docker", config=im.ImageConfig(user="1000"), extra_layers=[users]
    )


def _variant(tag: str) -> Callable[[], ImageIndex]:
    """public.ecr.aws busybox variants: OCI indexes telling their tag in /etc/variant."""
    return lambda: im.build_index(
        [
            im.platform_image(_foreign()),
            im.busybox_image(extra_layers=[im.marker_layer("etc/variant", tag + "\n")]),
        ]
    )


def own_images() -> list[CatalogImage]:
    """Images for the project's own tests (``local``, ``auth`` and ``token`` registries)."""
    docker_schema2 = lambda: im.busybox_image(  # noqa: E731
        media="docker", extra_layers=[im.marker_layer("etc/schema", "docker schema2\n")]
    )
    uncompressed = lambda: im.busybox_image(  # noqa: E731
        extra_layers=[im.marker_layer("etc/compression", "none\n", compression="none")]
    )
    return [
        CatalogImage(LOCAL, "library/busybox", ("latest",), im.busybox_image),
        CatalogImage(LOCAL, "test/multilayer", ("1",), im.multilayer_image),
        CatalogImage(LOCAL, "test/docker-schema2", ("1",), docker_schema2),
        CatalogImage(LOCAL, "test/multiarch", ("1",), im.multiarch_index),
        CatalogImage(
            LOCAL, "test/multiarch", ("docker",), lambda: im.multiarch_index(media="docker")
        ),
        CatalogImage(LOCAL, "test/user", ("uid",), lambda: im.user_image("1234")),
        CatalogImage(LOCAL, "test/user", ("name",), lambda: im.user_image("www")),
        CatalogImage(LOCAL, "test/user", ("uid-gid",), lambda: im.user_image("1000:1000")),
        CatalogImage(LOCAL, "test/user", ("name-group",), lambda: im.user_image("www:www")),
        CatalogImage(LOCAL, "test/entrypoint", ("1",), im.entrypoint_image),
        CatalogImage(LOCAL, "test/stopsignal", ("1",), im.stopsignal_image),
        CatalogImage(LOCAL, "test/httpd", ("1",), im.httpd_image),
        CatalogImage(LOCAL, "test/uncompressed", ("1",), uncompressed),
        CatalogImage(LOCAL, "test/large", ("1",), im.large_image),
        CatalogImage(LOCAL, "pause", ("3.9",), _listed(im.pause_image)),
        CatalogImage(AUTH, "private/busybox", ("latest",), im.busybox_image),
        CatalogImage(TOKEN, "private/busybox", ("latest",), im.busybox_image),
    ]


def critest_images() -> list[CatalogImage]:
    """Stand-ins for everything critest v1.36 (validation and benchmark) pulls."""
    ct = f"{CRI_TOOLS}/"
    gcr = "gcr.io"
    return [
        # registry.k8s.io/e2e-test-images: default container, web server, httpd, nnp.
        CatalogImage(
            "registry.k8s.io",
            f"{E2E}/busybox",
            ("1.29-2",),
            _listed(lambda: im.busybox_image(media="docker")),
        ),
        CatalogImage("registry.k8s.io", f"{E2E}/nginx", ("1.14-2",), _listed(im.nginx_like_image)),
        CatalogImage(
            "registry.k8s.io", f"{E2E}/httpd", ("2.4.39-4",), _listed(im.apache_like_image)
        ),
        CatalogImage(
            "registry.k8s.io", f"{E2E}/nonewprivs", ("1.3",), _listed(im.nonewprivs_image)
        ),
        # The same pause image from two registries (must end up one image ID).
        CatalogImage("registry.k8s.io", "pause", ("3.9",), _listed(im.pause_image)),
        CatalogImage("k8s.gcr.io", "pause", ("3.9",), _listed(im.pause_image)),
        # gcr.io/k8s-staging-cri-tools (see cri-tools images/build).
        CatalogImage(
            gcr,
            f"{ct}hostnet-nginx-{im.goarch()}",
            ("latest",),
            lambda: im.nginx_like_image(port=12003),
        ),
        CatalogImage(gcr, f"{ct}test-image-user-uid", ("latest",), _listed(_user("1002"))),
        CatalogImage(gcr, f"{ct}test-image-user-username", ("latest",), _listed(_user("www-data"))),
        CatalogImage(
            gcr, f"{ct}test-image-user-uid-group", ("latest",), _listed(_user("1003:1004"))
        ),
        CatalogImage(
            gcr, f"{ct}test-image-user-username-group", ("latest",), _listed(_user("www-data:1004"))
        ),
        CatalogImage(
            gcr, f"{ct}test-image-predefined-group", ("latest",), _listed(_predefined_group)
        ),
        CatalogImage(
            gcr, f"{ct}test-image-latest", ("latest",), _listed(_with_file("test-image-latest"))
        ),
        CatalogImage(
            gcr, f"{ct}test-image-digest", ("latest",), _listed(_with_file("test-image-digest"))
        ),
        CatalogImage(gcr, f"{ct}test-image-tag", ("test",), _listed(_with_file("test"))),
        CatalogImage(gcr, f"{ct}test-image-tag", ("all",), _listed(_with_file("all"))),
        *(
            CatalogImage(
                gcr, f"{ct}test-image-{i}", ("latest",), _listed(_with_file(f"test-image-{i}"))
            )
            for i in (1, 2, 3)
        ),
        CatalogImage(
            gcr, f"{ct}test-image-tags", ("1", "2", "3"), _listed(_with_file("same-image"))
        ),
        # public.ecr.aws: critest -benchmark image listing.
        *(
            CatalogImage("public.ecr.aws", "docker/library/busybox", (tag,), _variant(tag))
            for tag in ("1.35.0-glibc", "1-uclibc", "1", "1-glibc", "1-musl")
        ),
    ]


def catalog(*, critest: bool = True, own: bool = True) -> list[CatalogImage]:
    """The whole catalog."""
    return (own_images() if own else []) + (critest_images() if critest else [])


# -------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class PushedImage:
    """A catalog image as served: logical name, local reference, digest."""

    name: str
    registry: str
    local: str
    digest: str
    media_type: str
    image: AnyImage


_AUTH_MODES: dict[str, AuthMode] = {AUTH: "basic", TOKEN: "token"}


class ServedCatalog:
    """Registries (one per upstream host, plus local/auth/token) holding the catalog.

    ``async with ServedCatalog() as cat: cat.local("registry.k8s.io/pause:3.9")``.
    """

    def __init__(
        self,
        *,
        entries: Sequence[CatalogImage] | None = None,
        storage_dir: Path | None = None,
    ) -> None:
        self.entries = list(entries if entries is not None else catalog())
        self.storage_dir = storage_dir
        self.registries: dict[str, Registry] = {}
        self.images: dict[str, PushedImage] = {}
        self.timings: dict[str, float] = {}

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Build every image, start the registries, push."""
        t0 = time.monotonic()
        built = await asyncio.to_thread(lambda: [(e, e.build()) for e in self.entries])
        t1 = time.monotonic()
        keys = sorted({e.registry for e in self.entries})
        if self.storage_dir is not None:  # leftovers of a SIGKILLed run
            for stale in self.storage_dir.glob("cri-shim-*"):
                await asyncio.to_thread(shutil.rmtree, stale, True)
        for key in keys:
            root = self.storage_dir / key if self.storage_dir else None
            self.registries[key] = Registry(
                auth=_AUTH_MODES.get(key, "none"),
                username=USERNAME,
                password=PASSWORD,
                root=root,
                name=key.replace(".", "-"),
                workdir_parent=self.storage_dir,
            )
        await asyncio.gather(*(r.start() for r in self.registries.values()))
        t2 = time.monotonic()

        async def push_all(key: str) -> None:
            reg = self.registries[key]
            for entry, image in built:
                if entry.registry != key:
                    continue
                for tag, name in zip(entry.tags, entry.names(), strict=True):
                    digest = await reg.push(entry.repo, tag, image)
                    self.images[name] = PushedImage(
                        name, key, f"{reg.host}/{entry.repo}:{tag}", digest, image.media_type, image
                    )

        await asyncio.gather(*(push_all(k) for k in keys))
        t3 = time.monotonic()
        self.timings = {"build": t1 - t0, "start": t2 - t1, "push": t3 - t2}

    async def stop(self) -> None:
        regs, self.registries = list(self.registries.values()), {}
        await asyncio.gather(*(r.stop() for r in regs), return_exceptions=True)

    def endpoint(self, key: str) -> str:
        """``127.0.0.1:PORT`` of a registry (an upstream host, LOCAL, AUTH or TOKEN)."""
        return self.registries[key].host

    @property
    def mirrors(self) -> dict[str, str]:
        """Upstream host -> ``http://127.0.0.1:PORT`` of its local mirror."""
        return {k: r.url for k, r in self.registries.items() if k in UPSTREAMS}

    def local(self, name: str) -> str:
        """Local reference for a catalog name (``registry.k8s.io/pause:3.9``, ``test/user:uid``)."""
        return self.images[name].local

    def digest(self, name: str) -> str:
        return self.images[name].digest

    def state(self) -> dict[str, object]:
        """JSON-able description of what is served where."""
        regs: dict[str, object] = {}
        for key, r in self.registries.items():
            info: dict[str, object] = {"host": r.host, "url": r.url, "auth": r.auth}
            if r.auth != "none":
                info.update(username=r.username, password=r.password)
            if r.token_server is not None:
                info["token_realm"] = r.token_server.realm
            regs[key] = info
        imgs = {
            p.name: {
                "registry": p.registry,
                "local": p.local,
                "digest": p.digest,
                "mediaType": p.media_type,
            }
            for p in sorted(self.images.values(), key=lambda p: p.name)
        }
        return {
            "version": 1,
            "pid": os.getpid(),
            "registries": regs,
            "mirrors": self.mirrors,
            "images": imgs,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "skip": {"critest": ["public image with digest should be pulled and removed"]},
        }

    def write_hosts_dir(self, dest: Path) -> Path:
        """containerd ``config_path`` style dir: ``<host>/hosts.toml`` per mirrored host."""
        for host, url in self.mirrors.items():
            d = dest / host
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts.toml").write_text(
                f'server = "https://{host}"\n\n'
                f'[host."{url}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        return dest

    def write_state(self, state_dir: Path) -> Path:
        """Write ``catalog.json`` atomically (readers may poll for it) and certs.d."""
        state_dir.mkdir(parents=True, exist_ok=True)
        self.write_hosts_dir(state_dir / "certs.d")
        path = state_dir / "catalog.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path


# ---------------------------------------------------------------------------- CLI


async def _serve(state_dir: Path, *, critest: bool, own: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state_file = state_dir / "catalog.json"
    state_file.unlink(missing_ok=True)
    async with ServedCatalog(
        entries=catalog(critest=critest, own=own), storage_dir=state_dir / "storage"
    ) as cat:
        path = cat.write_state(state_dir)
        t = cat.timings
        print(
            f"catalog: {len(cat.images)} refs in {len(cat.registries)} registries "
            f"(build {t['build']:.1f}s, start {t['start']:.1f}s, push {t['push']:.1f}s); "
            f"state in {path}",
            flush=True,
        )
        await stop.wait()
    with contextlib.suppress(OSError):
        state_file.unlink()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``serve --state-dir DIR`` runs the registries; ``list`` prints the image names."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.catalog")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="serve the catalog until SIGTERM")
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--no-critest", action="store_true", help="only our own images")
    serve.add_argument("--no-own", action="store_true", help="only critest's images")
    sub.add_parser("list", help="print catalog image names")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for entry in catalog():
            for name in entry.names():
                print(f"{entry.registry:16} {name}")
        return 0
    return asyncio.run(_serve(args.state_dir, critest=not args.no_critest, own=not args.no_own))


if __name__ == "__main__":
    sys.exit(main())
