"""Local registries for tests: Debian's real ``docker-registry`` and a fault-injecting fake.

* :class:`Registry` runs ``docker-registry serve`` on 127.0.0.1 (optionally with
  htpasswd basic auth, or bearer-token auth backed by :class:`TokenServer`).
* :class:`RegistryClient` speaks the OCI distribution API (push/pull manifests
  and blobs, monolithic or chunked uploads, basic and bearer auth) with aiohttp.
* :class:`FakeRegistry` is an in-process aiohttp registry serving in-memory
  images, that can stall, trickle, truncate or corrupt blobs, or answer every
  request with an error (a broken mirror): pullers' failure paths need those and
  a real registry never misbehaves on cue.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib
import json
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeAlias
from urllib.parse import urlencode, urljoin

import aiohttp
from aiohttp import web

from tests.support.ports import free_port

from .images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    AnyImage,
    Blob,
)

Upload: TypeAlias = Literal["monolithic", "chunked"]
AuthMode: TypeAlias = Literal["none", "basic", "token"]
BlobFault: TypeAlias = Literal["none", "stall", "trickle", "truncate", "corrupt"]

ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


class RegistryError(RuntimeError):
    """A registry answered something unexpected."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _is_digest(ref: str) -> bool:
    return bool(DIGEST_RE.match(ref))


# --------------------------------------------------------------------------- client


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class RegistryClient:
    """Minimal OCI distribution client: enough to push test images and read them back."""

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.username, self.password = username, password
        self._session = session
        self._own_session = session is None
        self._auth: dict[str, str] = {}  # scope key -> Authorization header value

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        return self._session

    def _basic(self) -> str | None:
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _authorize(self, challenge: str, scope: str) -> str | None:
        """Authorization header answering a 401 challenge, or None if we cannot."""
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            return self._basic()
        if scheme != "bearer" or "realm" not in params:
            return None
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or scope
        if self.username:
            query["account"] = self.username
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urlencode(query)
        async with self.session.get(url, headers=headers) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
        token = body.get("token") or body.get("access_token")
        return f"Bearer {token}" if token else None

    async def request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        allow: tuple[int, ...] = (200, 201, 202, 204),
    ) -> tuple[int, dict[str, str], bytes]:
        """Send, answering one auth challenge; returns (status, headers, body)."""
        if not url.startswith("http"):
            url = urljoin(self.base_url + "/", url.lstrip("/"))
        for attempt in range(2):
            hdrs = dict(headers or {})
            if scope in self._auth:
                hdrs["Authorization"] = self._auth[scope]
            async with self.session.request(
                method, url, data=data, headers=hdrs, allow_redirects=True
            ) as resp:
                body = await resp.read()
                rh = {k.lower(): v for k, v in resp.headers.items()}
                if resp.status == 401 and attempt == 0:
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    value = await self._authorize(challenge, scope)
                    if value is not None:
                        self._auth[scope] = value
                        continue
                if resp.status not in allow:
                    raise RegistryError(
                        f"{method} {url}: HTTP {resp.status} {body[:300]!r}", resp.status
                    )
                return resp.status, rh, body
        raise AssertionError("unreachable")

    async def ping(self) -> int:
        """Status of ``GET /v2/`` (200, or 401 when auth is required and not given)."""
        status, _, _ = await self.request(
            "GET", "/v2/", scope="registry:catalog:*", allow=(200, 401)
        )
        return status

    # -- blobs

    async def blob_exists(self, repo: str, digest: str) -> bool:
        status, _, _ = await self.request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            scope=f"repository:{repo}:pull,push",
            allow=(200, 404),
        )
        return status == 200

    async def push_blob(
        self, repo: str, blob: Blob, *, upload: Upload = "monolithic", chunk_size: int = 1 << 20
    ) -> None:
        """Upload ``blob`` unless the registry already has it."""
        scope = f"repository:{repo}:pull,push"
        if await self.blob_exists(repo, blob.digest):
            return
        _, h, _ = await self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope)
        location = urljoin(self.base_url + "/", h["location"])
        octet = {"Content-Type": "application/octet-stream"}
        if upload == "chunked":
            for start in range(0, blob.size, chunk_size):
                chunk = blob.data[start : start + chunk_size]
                _, h, _ = await self.request(
                    "PATCH",
                    location,
                    scope=scope,
                    data=chunk,
                    headers={**octet, "Content-Range": f"{start}-{start + len(chunk) - 1}"},
                )
                location = urljoin(self.base_url + "/", h["location"])
            body = b""
        else:
            body = blob.data
        sep = "&" if "?" in location else "?"
        _, h, _ = await self.request(
            "PUT",
            f"{location}{sep}{urlencode({'digest': blob.digest})}",
            scope=scope,
            data=body,
            headers=octet,
            allow=(201, 204),
        )
        got = h.get("docker-content-digest", blob.digest)
        if got != blob.digest:
            raise RegistryError(f"blob digest mismatch: sent {blob.digest}, registry {got}")

    async def get_blob(self, repo: str, digest: str) -> bytes:
        _, _, body = await self.request(
            "GET", f"/v2/{repo}/blobs/{digest}", scope=f"repository:{repo}:pull"
        )
        return body

    # -- manifests

    async def put_manifest(self, repo: str, ref: str, manifest: Blob) -> str:
        """PUT a manifest/index under a tag or its digest; returns the digest."""
        _, h, _ = await self.request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            scope=f"repository:{repo}:pull,push",
            data=manifest.data,
            headers={"Content-Type": manifest.media_type},
            allow=(201,),
        )
        got = h.get("docker-content-digest", manifest.digest)
        if got != manifest.digest:
            raise RegistryError(f"manifest digest mismatch: sent {manifest.digest}, got {got}")
        return got

    async def get_manifest(
        self, repo: str, ref: str, *, accept: str = ACCEPT_MANIFESTS, method: str = "GET"
    ) -> tuple[bytes, str, str]:
        """(body, media type, Docker-Content-Digest) of a manifest by tag or digest."""
        _, h, body = await self.request(
            method,
            f"/v2/{repo}/manifests/{ref}",
            scope=f"repository:{repo}:pull",
            headers={"Accept": accept},
        )
        media = h.get("content-type", "").split(";")[0].strip()
        return body, media, h.get("docker-content-digest", "")

    async def tags(self, repo: str) -> list[str]:
        _, _, body = await self.request(
            "GET", f"/v2/{repo}/tags/list", scope=f"repository:{repo}:pull"
        )
        tags: list[str] = json.loads(body).get("tags") or []
        return tags

    async def push(
        self,
        repo: str,
        ref: str,
        image: AnyImage,
        *,
        upload: Upload = "monolithic",
        chunk_size: int = 1 << 20,
    ) -> str:
        """Push blobs, child manifests (by digest) and the top manifest; returns its digest."""
        for child in image.images:
            for blob in child.blobs():
                await self.push_blob(repo, blob, upload=upload, chunk_size=chunk_size)
            if child is not image:
                await self.put_manifest(repo, child.digest, child.manifest)
        return await self.put_manifest(repo, ref, image.manifest)


# ------------------------------------------------------------------ token server


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level (tag, content) items of a DER buffer."""
    out, pos = [], 0
    while pos < len(data):
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def _rsa_private(pem: str) -> tuple[int, int]:
    """(n, d) of a PEM RSA key, PKCS#1 or PKCS#8 (tiny DER reader, no crypto libs)."""
    b64 = "".join(x for x in pem.splitlines() if x and not x.startswith("-----"))
    ((_, seq),) = _der_items(base64.b64decode(b64))
    items = _der_items(seq)
    if items[1][0] == 0x30:  # PKCS#8 PrivateKeyInfo: version, algorithm, OCTET STRING
        ((_, seq),) = _der_items(items[2][1])
        items = _der_items(seq)
    n = int.from_bytes(items[1][1], "big")
    d = int.from_bytes(items[3][1], "big")
    return n, d


_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A Docker token-auth server (``/token``) issuing RS256 JWTs for a registry.

    Authenticated requests get the actions they ask for; anonymous ones get
    ``pull`` only when ``anonymous_pull`` is set.  Keys come from ``openssl``.
    """

    username: str
    password: str
    workdir: Path
    anonymous_pull: bool = False
    service: str = "cri-shim-test-registry"
    issuer: str = "cri-shim-test-issuer"
    requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    # When set, OAuth2 POSTs with this refresh token get a token (404 otherwise,
    # so a client falls back to the GET with Basic credentials).
    refresh_token: str = ""
    cert_path: Path = field(init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)
    _key: tuple[int, int] = field(default=(0, 0), init=False)
    _x5c: str = field(default="", init=False)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def start(self) -> None:
        key, self.cert_path = self.workdir / "token.key", self.workdir / "token.crt"
        proc = await asyncio.create_subprocess_exec(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=cri-shim-test-token",
            "-keyout",
            str(key),
            "-out",
            str(self.cert_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RegistryError(f"openssl failed: {err.decode()}")
        self._key = _rsa_private(key.read_text())
        cert_pem = self.cert_path.read_text()
        self._x5c = "".join(x for x in cert_pem.splitlines() if x and not x.startswith("-----"))
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._oauth2)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def sign(self, claims: Mapping[str, object]) -> str:
        """RS256 JWT carrying the cert in ``x5c`` (how distribution finds the key)."""
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        n, d = self._key
        k = (n.bit_length() + 7) // 8
        t = _SHA256_DIGEST_INFO + hashlib.sha256(signing_input.encode()).digest()
        em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        sig = pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")
        return signing_input + "." + _b64url(sig)

    async def _token(self, request: web.Request) -> web.Response:
        authed = False
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if (user, pw) != (self.username, self.password):
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
            authed = True
        self.requests.append({"scope": request.query.get("scope", ""), "authed": str(authed)})
        return self._grant(request.query.getall("scope", []), authed)

    async def _oauth2(self, request: web.Request) -> web.Response:
        """The OAuth2 token endpoint: a form POST with grant_type=refresh_token."""
        if not self.refresh_token:
            return web.Response(status=404)
        form = await request.post()
        record = {key: str(value) for key, value in form.items()}
        record["method"] = "POST"
        self.requests.append(record)
        if (record.get("grant_type"), record.get("refresh_token")) != (
            "refresh_token",
            self.refresh_token,
        ):
            return web.json_response({"error": "invalid_grant"}, status=401)
        record["authed"] = "True"
        return self._grant(record.get("scope", "").split(), authed=True)

    def _grant(self, scopes: list[str], authed: bool) -> web.Response:
        access = []
        for scope in scopes:
            typ, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = (
                wanted if authed else [a for a in wanted if a == "pull" and self.anonymous_pull]
            )
            access.append({"type": typ, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": self.username if authed else "",
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = self.sign(claims)
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": 600,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            }
        )


# ------------------------------------------------------------------ real registry


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # JSON strings are valid YAML scalars


async def htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd line (docker-registry accepts bcrypt only)."""
    exe = shutil.which("htpasswd")
    if exe:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "-Bbn",
            username,
            password,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RegistryError(f"htpasswd failed: {err.decode()}")
        return out.decode().strip()
    try:
        bcrypt = importlib.import_module("bcrypt")
    except ImportError as exc:
        raise RegistryError("need htpasswd (apache2-utils) or python bcrypt") from exc
    hashed: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt())
    return f"{username}:{hashed.decode()}"


class Registry:
    """Debian's ``docker-registry`` on 127.0.0.1 with storage in a temp dir.

    ``auth``: ``"none"``, ``"basic"`` (htpasswd) or ``"token"`` (bearer tokens
    from a :class:`TokenServer`).  Config, log and (unless ``root`` is given)
    storage go to a fresh ``cri-shim-<name>-*`` dir under ``workdir_parent``
    (default: the system temp dir), removed by :meth:`stop`.
    Use as ``async with Registry() as reg``.
    """

    def __init__(
        self,
        *,
        auth: AuthMode = "none",
        username: str = "cri-shim",
        password: str = "s3cret-test-password",
        root: Path | None = None,
        name: str = "registry",
        binary: str | None = None,
        anonymous_pull: bool = False,
        workdir_parent: Path | None = None,
    ) -> None:
        self.auth = auth
        self.username, self.password = username, password
        self.name = name
        self.binary = binary or shutil.which("docker-registry") or "/usr/bin/docker-registry"
        self.anonymous_pull = anonymous_pull
        self._root = root
        self._own_root = root is None
        self._workdir_parent = workdir_parent
        self.port = 0
        self.token_server: TokenServer | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._workdir: Path | None = None
        self._client: RegistryClient | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        assert self._root is not None
        return self._root

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "registry.log"

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _config(self) -> str:
        assert self._workdir is not None and self._root is not None
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {_yaml_str(str(self._root))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {_yaml_str(uuid.uuid4().hex)}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.auth == "basic":
            lines += [
                "auth:",
                "  htpasswd:",
                f"    realm: {_yaml_str('cri-shim-test-' + self.name)}",
                f"    path: {_yaml_str(str(self._workdir / 'htpasswd'))}",
            ]
        elif self.auth == "token":
            assert self.token_server is not None
            ts = self.token_server
            lines += [
                "auth:",
                "  token:",
                f"    realm: {_yaml_str(ts.realm)}",
                f"    service: {_yaml_str(ts.service)}",
                f"    issuer: {_yaml_str(ts.issuer)}",
                f"    rootcertbundle: {_yaml_str(str(ts.cert_path))}",
            ]
        return "\n".join(lines) + "\n"

    async def start(self, timeout: float = 30.0) -> None:
        """Start the registry and wait until ``/v2/`` answers."""
        if not shutil.which(self.binary):
            raise RegistryError(f"{self.binary} missing (apt-get install docker-registry)")
        if self._workdir_parent is not None:
            self._workdir_parent.mkdir(parents=True, exist_ok=True)
        self._workdir = Path(
            tempfile.mkdtemp(prefix=f"cri-shim-{self.name}-", dir=self._workdir_parent)
        )
        if self._root is None:
            self._root = self._workdir / "storage"
        self._root.mkdir(parents=True, exist_ok=True)
        if self.auth == "basic":
            line = await htpasswd_line(self.username, self.password)
            (self._workdir / "htpasswd").write_text(line + "\n")
        elif self.auth == "token":
            self.token_server = TokenServer(
                self.username, self.password, self._workdir, anonymous_pull=self.anonymous_pull
            )
            await self.token_server.start()
        last = ""
        for _ in range(5):
            self.port = free_port()
            cfg = self._workdir / "config.yml"
            cfg.write_text(self._config())
            # setpriv --pdeathsig: the registry dies with us even if we are SIGKILLed.
            setpriv = shutil.which("setpriv")
            prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
            with self.log_path.open("ab") as log:
                self._proc = await asyncio.create_subprocess_exec(
                    *prefix,
                    self.binary,
                    "serve",
                    str(cfg),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            why = await self._wait_ready(timeout)
            if why is None:
                return
            last = f"{why}\n{self.log_tail()}"
            await self._kill()
            if "address already in use" not in last:
                break
        await self.stop()
        raise RegistryError(f"docker-registry did not start:\n{last}")

    async def _wait_ready(self, timeout: float) -> str | None:
        """None once ``/v2/`` answers; otherwise why not (exit status or the
        last probe's error), so a failed start says what happened."""
        deadline = time.monotonic() + timeout
        last_error = "no probe answered"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.returncode is not None:
                    code = self._proc.returncode
                    how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
                    return f"docker-registry {how} (last probe: {last_error})"
                try:
                    async with s.get(self.url + "/v2/") as resp:
                        if resp.status in (200, 401):
                            return None
                        last_error = f"HTTP {resp.status}"
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.05)
        return f"docker-registry gave no answer in {timeout:.0f} s (last probe: {last_error})"

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop the process (and token server); remove storage we created."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self._kill()
        if self.token_server is not None:
            await self.token_server.stop()
            self.token_server = None
        if self._workdir is not None:
            # Storage lives in the workdir unless the caller gave its own root.
            await asyncio.to_thread(shutil.rmtree, self._workdir, True)
            self._workdir = None
            if self._own_root:
                self._root = None

    def client(self, *, anonymous: bool = False) -> RegistryClient:
        """A new client; credentials included unless ``anonymous``."""
        if anonymous or self.auth == "none":
            return RegistryClient(self.url)
        return RegistryClient(self.url, username=self.username, password=self.password)

    async def push(
        self,
        repo: str,
        ref: str,
        image: AnyImage,
        *,
        upload: Upload = "monolithic",
        chunk_size: int = 1 << 20,
    ) -> str:
        """Push ``image`` as ``repo:ref`` (``ref`` a tag or digest); returns its digest."""
        if self._client is None:
            self._client = self.client()
        return await self._client.push(repo, ref, image, upload=upload, chunk_size=chunk_size)


# ------------------------------------------------------------------ fake registry


@dataclass
class RequestRecord:
    """One request a :class:`FakeRegistry` saw."""

    method: str
    path: str
    range: str = ""


class FakeRegistry:
    """In-process registry serving in-memory images with injectable faults.

    ``blob_fault`` applies to layer blobs (and configs too if ``fault_configs``):

    * ``stall``: send headers and ``fault_after`` bytes, then nothing until stop;
    * ``trickle``: send ``trickle_bytes`` every ``trickle_interval`` seconds;
    * ``truncate``: send ``fault_after`` bytes and drop the connection;
    * ``corrupt``: send the full length with one byte flipped (digest mismatch).

    ``fail_status`` answers every ``/v2/<name>/...`` request with that status
    (and ``/v2/`` too if ``fail_ping``): a broken mirror.  ``Range`` requests on
    healthy blobs get 206, for resume tests.
    """

    def __init__(
        self,
        *,
        blob_fault: BlobFault = "none",
        fault_after: int = 0,
        trickle_bytes: int = 1,
        trickle_interval: float = 1.0,
        fault_configs: bool = False,
        fail_status: int | None = None,
        fail_ping: bool = False,
    ) -> None:
        self.blob_fault = blob_fault
        self.fault_after = fault_after
        self.trickle_bytes = trickle_bytes
        self.trickle_interval = trickle_interval
        self.fault_configs = fault_configs
        self.fail_status = fail_status
        self.fail_ping = fail_ping
        self.requests: list[RequestRecord] = []
        self.port = 0
        self._tags: dict[str, dict[str, Blob]] = {}
        self._manifests: dict[str, dict[str, Blob]] = {}
        self._blobs: dict[str, dict[str, Blob]] = {}
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def add(self, repo: str, ref: str, image: AnyImage) -> None:
        """Serve ``image`` as ``repo:ref`` (and by digest)."""
        mans, blobs = self._manifests.setdefault(repo, {}), self._blobs.setdefault(repo, {})
        for child in image.images:
            mans[child.digest] = child.manifest
            for b in child.blobs():
                blobs[b.digest] = b
        mans[image.digest] = image.manifest
        if not _is_digest(ref):
            self._tags.setdefault(repo, {})[ref] = image.manifest

    def requested(self, kind: str = "") -> list[RequestRecord]:
        """Requests whose path contains ``/<kind>/`` (``blobs``, ``manifests``) or all."""
        return [r for r in self.requests if not kind or f"/{kind}/" in r.path]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/v2/", self._ping)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Release stalled responses and shut the server down."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _record(self, request: web.Request) -> None:
        self.requests.append(
            RequestRecord(request.method, request.path, request.headers.get("Range", ""))
        )

    def _error(self, status: int, code: str) -> web.Response:
        return web.json_response(
            {"errors": [{"code": code, "message": code.lower()}]}, status=status
        )

    async def _ping(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.fail_status is not None and self.fail_ping:
            return self._error(self.fail_status, "UNKNOWN")
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _manifest(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.fail_status is not None:
            return self._error(self.fail_status, "UNKNOWN")
        name, ref = request.match_info["name"], request.match_info["ref"]
        blob = (
            self._tags.get(name, {}) if not _is_digest(ref) else self._manifests.get(name, {})
        ).get(ref)
        if blob is None:
            return self._error(404, "MANIFEST_UNKNOWN")
        headers = {"Docker-Content-Digest": blob.digest, "Content-Type": blob.media_type}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(blob.size)})
        return web.Response(body=blob.data, headers=headers)

    def _faulty(self, blob: Blob) -> bool:
        if self.blob_fault == "none":
            return False
        is_config = blob.media_type.endswith("json")
        return self.fault_configs or not is_config

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if self.fail_status is not None:
            return self._error(self.fail_status, "UNKNOWN")
        name, digest = request.match_info["name"], request.match_info["digest"]
        blob = self._blobs.get(name, {}).get(digest)
        if blob is None:
            return self._error(404, "BLOB_UNKNOWN")
        headers = {"Docker-Content-Digest": blob.digest, "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(blob.size)})
        data, status = blob.data, 200
        if not self._faulty(blob):
            m = re.match(r"bytes=(\d+)-(\d*)$", request.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else blob.size - 1
                data, status = blob.data[start : end + 1], 206
                headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
            return web.Response(body=data, status=status, headers=headers)
        if self.blob_fault == "corrupt":
            i = min(self.fault_after, blob.size - 1)
            bad = bytearray(data)
            bad[i] ^= 0xFF
            return web.Response(body=bytes(bad), headers=headers)
        resp = web.StreamResponse(status=200, headers={**headers, "Content-Length": str(blob.size)})
        await resp.prepare(request)
        if self.blob_fault == "trickle":
            pos = 0
            while pos < blob.size and not self._closing.is_set():
                await resp.write(data[pos : pos + self.trickle_bytes])
                pos += self.trickle_bytes
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.trickle_interval)
            if pos >= blob.size:
                await resp.write_eof()
            return resp
        await resp.write(data[: self.fault_after])
        if self.blob_fault == "stall":
            await self._closing.wait()
        transport = request.transport
        if transport is not None:
            transport.close()  # drop the connection mid-body
        return resp


def stalling_registry(
    repo: str,
    ref: str,
    image: AnyImage,
    *,
    fault_after: int = 1024,
    trickle: bool = False,
    trickle_interval: float = 1.0,
) -> FakeRegistry:
    """A (not yet started) registry whose layer downloads stall (or trickle) mid-blob."""
    reg = FakeRegistry(
        blob_fault="trickle" if trickle else "stall",
        fault_after=fault_after,
        trickle_interval=trickle_interval,
    )
    reg.add(repo, ref, image)
    return reg


def broken_mirror(status: int = 500, *, fail_ping: bool = False) -> FakeRegistry:
    """A (not yet started) mirror that answers every manifest/blob request with ``status``."""
    return FakeRegistry(fail_status=status, fail_ping=fail_ping)


__all__ = [
    "ACCEPT_MANIFESTS",
    "FakeRegistry",
    "Registry",
    "RegistryClient",
    "RegistryError",
    "RequestRecord",
    "TokenServer",
    "broken_mirror",
    "free_port",
    "htpasswd_line",
    "stalling_registry",
]
