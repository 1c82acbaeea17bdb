"""Which URLs serve a registry host, and how to talk to each (TLS, headers, scheme).

Two configuration styles that containerd users already know:

* `registry.config_path`: a directory of `<host>/hosts.toml` files (containerd's
  hosts.toml format; `_default/` applies to hosts without their own directory,
  and a directory without hosts.toml is read Docker certs.d style). Files are
  re-read on every pull, so edits need no restart.
* `registry.mirrors."<host>".endpoint` lists and `registry.configs."<host>"`
  TLS / auth tables (containerd's older CRI config).

The registry itself is always tried last, unless hosts.toml `server` names
another URL for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cri_shim.registry.errors import RegistryError
from cri_shim.registry.reference import DEFAULT_DOMAIN
from cri_shim.settings import RegistryAuthSettings, RegistrySettings, parse_duration

DOCKER_HUB_HOST = "registry-1.docker.io"
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
DEFAULT_DIAL_TIMEOUT = 30.0


@dataclass(frozen=True)
class TlsConfig:
    """What an https endpoint is verified against; hashable so SSL contexts can be cached."""

    ca_files: tuple[str, ...] = ()
    # (certificate, key) pairs; the key may be "" when the PEM holds both.
    client_pairs: tuple[tuple[str, str], ...] = ()
    skip_verify: bool = False

    @property
    def is_default(self) -> bool:
        return not (self.ca_files or self.client_pairs or self.skip_verify)


@dataclass(frozen=True)
class Endpoint:
    """One URL that can serve a registry host's content."""

    # API root, `/v2` included: `http://127.0.0.1:5000/v2`.
    url: str
    # `host[:port]` of `url`: the key for TLS / auth config and token caches.
    host: str
    capabilities: frozenset[str] = ALL_CAPABILITIES
    tls: TlsConfig = TlsConfig()
    headers: tuple[tuple[str, str], ...] = ()
    # A mirror (not the registry the reference names): gets `?ns=<registry>`.
    mirror: bool = False
    # Scheme unknown (loopback or insecure host): try https, then plain http.
    http_fallback: bool = False
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    # Credentials from `registry.configs`, used when the request has none.
    auth: RegistryAuthSettings | None = field(default=None, compare=False)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    def with_scheme(self, scheme: str) -> Endpoint:
        url = urlsplit(self.url)._replace(scheme=scheme).geturl()
        return dataclasses.replace(self, url=url, http_fallback=False)


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 and ::1, with or without a port."""
    name = _hostname(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _port(host: str) -> str:
    if host.startswith("["):
        rest = host[host.find("]") + 1 :] if "]" in host else ""
        return rest[1:] if rest.startswith(":") else ""
    return host.rsplit(":", 1)[1] if host.count(":") == 1 else ""


def api_url(url: str, *, override_path: bool = False) -> str:
    """`https://h` -> `https://h/v2`; a path is kept and `/v2` added unless `override_path`."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not override_path and not path.endswith("/v2"):
        path += "/v2"
    return parts._replace(path=path, query="", fragment="").geturl()


def _with_scheme(url: str) -> str:
    return url if "://" in url else f"https://{url}"


class RegistryHosts:
    """Builds the ordered endpoint list for a registry host from the settings."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self._insecure = {h.lower() for h in settings.insecure_registries}

    def default_server(self, domain: str) -> tuple[str, bool]:
        """(URL, try-http-too) of the registry itself when nothing overrides it."""
        if domain == DEFAULT_DOMAIN:
            return f"https://{DOCKER_HUB_HOST}", False
        fallback = domain.lower() in self._insecure or (
            is_loopback(domain) and _port(domain) not in ("", "443")
        )
        return f"https://{domain}", fallback

    def _config_auth(self, *hosts: str) -> RegistryAuthSettings | None:
        for host in hosts:
            config = self.settings.configs.get(host)
            if config is not None and (
                config.auth.username or config.auth.auth or config.auth.identitytoken
            ):
                return config.auth
        return None

    def _config_tls(self, host: str, base: TlsConfig) -> TlsConfig:
        """Inline `registry.configs."host".tls` and `insecure_registries` on top of `base`."""
        tls = base
        config = self.settings.configs.get(host) or self.settings.configs.get("*")
        if config is not None:
            t = config.tls
            tls = TlsConfig(
                tls.ca_files + ((t.ca_file,) if t.ca_file else ()),
                tls.client_pairs + (((t.cert_file, t.key_file),) if t.cert_file else ()),
                tls.skip_verify or t.insecure_skip_verify,
            )
        if host.lower() in self._insecure:
            tls = TlsConfig(tls.ca_files, tls.client_pairs, True)
        return tls

    def _endpoint(
        self,
        url: str,
        *,
        domain: str,
        mirror: bool,
        capabilities: frozenset[str] = ALL_CAPABILITIES,
        tls: TlsConfig | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        override_path: bool = False,
        http_fallback: bool = False,
        dial_timeout: float = DEFAULT_DIAL_TIMEOUT,
    ) -> Endpoint:
        full = _with_scheme(url)
        parts = urlsplit(full)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(
                f"registry endpoint {url!r} for {domain} must be an http:// or https:// URL",
                host=domain,
            )
        host = parts.netloc
        auth_hosts = (host,) if mirror else (host, domain)
        http_fallback = http_fallback or ("://" not in url and host.lower() in self._insecure)
        tls = self._config_tls(host, tls or TlsConfig())
        if http_fallback:
            # Like containerd for localhost and Docker for insecure registries: a host
            # that may not even speak TLS is not held to a verified certificate.
            tls = dataclasses.replace(tls, skip_verify=True)
        return Endpoint(
            url=api_url(full, override_path=override_path),
            host=host,
            capabilities=capabilities,
            tls=tls,
            headers=headers,
            mirror=mirror,
            http_fallback=http_fallback,
            dial_timeout=dial_timeout,
            auth=self._config_auth(*auth_hosts),
        )

    async def endpoints(self, domain: str) -> list[Endpoint]:
        """Endpoints for `domain`, in the order they are tried."""
        if self.settings.config_path:
            found = await asyncio.to_thread(self._read_host_dir, domain)
            if found is not None:
                return found
        return self._inline(domain)

    def _inline(self, domain: str) -> list[Endpoint]:
        mirror = self.settings.mirrors.get(domain) or self.settings.mirrors.get("*")
        server, fallback = self.default_server(domain)
        server_host = urlsplit(server).netloc
        found: list[Endpoint] = []
        for url in mirror.endpoint if mirror is not None else ():
            host = urlsplit(_with_scheme(url)).netloc
            is_server = host in (domain, server_host)
            found.append(self._endpoint(url, domain=domain, mirror=not is_server))
        if not any(not e.mirror for e in found):
            found.append(
                self._endpoint(server, domain=domain, mirror=False, http_fallback=fallback)
            )
        return found

    # -- hosts.toml

    def _host_dir(self, domain: str) -> Path | None:
        root = Path(self.settings.config_path)
        for name in (domain, "_default"):
            candidate = root / name
            if candidate.is_dir():
                return candidate
        return None

    def _read_host_dir(self, domain: str) -> list[Endpoint] | None:
        """Blocking: run in a thread. None when no directory applies to `domain`."""
        directory = self._host_dir(domain)
        if directory is None:
            return None
        path = directory / "hosts.toml"
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return self._certs_dir(directory, domain)
        except OSError as err:
            raise RegistryError(f"cannot read {path}: {err.strerror or err}", host=domain) from err
        try:
            data = tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise RegistryError(f"{path} is not valid TOML: {err}", host=domain) from err
        try:
            return self._parse_hosts(data, directory, domain)
        except (TypeError, ValueError) as err:
            raise RegistryError(f"invalid {path}: {err}", host=domain) from err

    def _certs_dir(self, directory: Path, domain: str) -> list[Endpoint]:
        """Docker's certs.d layout: `*.crt` CAs and `*.cert` / `*.key` client pairs."""
        files = sorted(directory.iterdir())
        cas = tuple(str(p) for p in files if p.suffix == ".crt")
        pairs = tuple(
            (str(p), str(p.with_suffix(".key")))
            for p in files
            if p.suffix == ".cert" and p.with_suffix(".key").exists()
        )
        server, fallback = self.default_server(domain)
        tls = TlsConfig(cas, pairs, False)
        return [
            self._endpoint(server, domain=domain, mirror=False, tls=tls, http_fallback=fallback)
        ]

    def _parse_hosts(self, data: Mapping[str, Any], directory: Path, domain: str) -> list[Endpoint]:
        found: list[Endpoint] = []
        hosts = data.get("host", {})
        if not isinstance(hosts, Mapping):
            raise ValueError('`host` must be a table of [host."<url>"] tables')
        server_url = data.get("server")
        for url, options in hosts.items():
            if not isinstance(options, Mapping):
                raise ValueError(f"[host.{url!r}] must be a table")
            found.append(self._hosts_entry(url, options, directory, domain, mirror=True))
        if server_url is None:
            server, fallback = self.default_server(domain)
            entry = self._hosts_entry(
                server, data, directory, domain, mirror=False, http_fallback=fallback
            )
        elif isinstance(server_url, str):
            entry = self._hosts_entry(server_url, data, directory, domain, mirror=False)
        else:
            raise ValueError("`server` must be a URL string")
        found.append(entry)
        return found

    def _hosts_entry(
        self,
        url: str,
        options: Mapping[str, Any],
        directory: Path,
        domain: str,
        *,
        mirror: bool,
        http_fallback: bool = False,
    ) -> Endpoint:
        capabilities = options.get("capabilities")
        if capabilities is None:
            caps = ALL_CAPABILITIES
        elif isinstance(capabilities, list) and all(isinstance(c, str) for c in capabilities):
            caps = frozenset(capabilities)
        else:
            raise ValueError(f"{url}: capabilities must be a list of strings")
        skip_verify = options.get("skip_verify", False)
        if not isinstance(skip_verify, bool):
            raise ValueError(f"{url}: skip_verify must be true or false")
        override_path = options.get("override_path", False)
        if not isinstance(override_path, bool):
            raise ValueError(f"{url}: override_path must be true or false")
        dial = options.get("dial_timeout")
        dial_timeout = parse_duration(dial) if isinstance(dial, str) else DEFAULT_DIAL_TIMEOUT
        tls = TlsConfig(
            self._paths(options.get("ca"), directory, f"{url}: ca"),
            self._client_pairs(options.get("client"), directory, url),
            skip_verify,
        )
        return self._endpoint(
            url,
            domain=domain,
            mirror=mirror,
            capabilities=caps,
            tls=tls,
            headers=self._headers(options.get("header"), url),
            override_path=override_path,
            http_fallback=http_fallback,
            dial_timeout=dial_timeout,
        )

    @staticmethod
    def _resolve(path: str, directory: Path) -> str:
        return path if os.path.isabs(path) else str(directory / path)

    def _paths(self, value: Any, directory: Path, what: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (self._resolve(value, directory),)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(self._resolve(v, directory) for v in value)
        raise ValueError(f"{what} must be a path or a list of paths")

    def _client_pairs(self, value: Any, directory: Path, url: str) -> tuple[tuple[str, str], ...]:
        """`client = "c.pem"`, `["c.cert", "c.key"]` or `[["c.cert", "c.key"], ...]`."""
        if value is None:
            return ()
        if isinstance(value, str):
            return ((self._resolve(value, directory), ""),)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if len(value) not in (1, 2):
                raise ValueError(f"{url}: client must be [cert, key]")
            key = self._resolve(value[1], directory) if len(value) == 2 else ""
            return ((self._resolve(value[0], directory), key),)
        if isinstance(value, list):
            pairs: list[tuple[str, str]] = []
            for item in value:
                pairs += self._client_pairs(item, directory, url)
            return tuple(pairs)
        raise ValueError(f"{url}: client must be a path, [cert, key] or a list of those")

    @staticmethod
    def _headers(value: Any, url: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            raise ValueError(f"{url}: header must be a table")
        headers: list[tuple[str, str]] = []
        for name, raw in value.items():
            values = raw if isinstance(raw, list) else [raw]
            if not all(isinstance(v, str) for v in values):
                raise ValueError(f"{url}: header {name!r} must be a string or list of strings")
            headers += [(str(name), v) for v in values]
        return tuple(headers)


__all__ = [
    "DOCKER_HUB_HOST",
    "Endpoint",
    "RegistryHosts",
    "TlsConfig",
    "api_url",
    "is_loopback",
    "parse_duration",
]
