"""Registry authentication: WWW-Authenticate challenges, Basic, and Docker/OCI bearer tokens.

Tokens are cached per (registry host, scope, credentials) until shortly before
they expire, so a pull of N layers costs one token request, not N + 1; and
once a host is known to want a token, later requests fetch it up front
instead of collecting a 401 first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp

from cri_shim.logs import log_event
from cri_shim.registry.errors import (
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
)
from cri_shim.registry.types import Credentials

log = logging.getLogger("cri_shim.registry")

# Tokens are dropped this many seconds before the expiry the server gave.
EXPIRY_MARGIN = 10.0
# distribution's default when a token response carries no expires_in.
DEFAULT_TOKEN_LIFETIME = 60.0
CLIENT_ID = "cri-shim"
MAX_TOKEN_RESPONSE = 1 << 20

_CHALLENGE_PART = re.compile(
    r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)"""
    r"""|([!#$%&'*+.^_`|~0-9A-Za-z-]+)"""
)


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer"
    params: Mapping[str, str]


def parse_challenges(headers: Sequence[str]) -> list[Challenge]:
    """Every challenge of the WWW-Authenticate header(s), in order.

    Quoted values may contain commas (`scope="repository:a:pull,push"`).
    """
    found: list[tuple[str, dict[str, str]]] = []
    for header in headers:
        for match in _CHALLENGE_PART.finditer(header):
            key, value, scheme = match.groups()
            if scheme is not None:
                found.append((scheme.lower(), {}))
            elif found and key is not None:
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                found[-1][1][key.lower()] = value
    return [Challenge(scheme, MappingProxyType(params)) for scheme, params in found]


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def describe_credentials(credentials: Credentials | None) -> str:
    """How an error message names what we presented, never the secret itself."""
    if credentials is None or credentials.empty:
        return "no credentials"
    if credentials.registry_token:
        return "the registry token"
    if credentials.identity_token:
        return "the identity token"
    return f"credentials for user {credentials.username!r}"


@dataclass
class _Cached:
    header: str
    expires_at: float


class Authorizer:
    """Answers challenges for one RegistryClient; all state is per process, in memory."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, Credentials | None], _Cached] = {}
        self._challenges: dict[str, Challenge] = {}

    def learn(self, host: str, challenges: Sequence[Challenge]) -> Challenge | None:
        """Remember the challenge we can answer (Bearer preferred over Basic)."""
        for scheme in ("bearer", "basic"):
            for challenge in challenges:
                if challenge.scheme == scheme:
                    self._challenges[host] = challenge
                    return challenge
        return None

    def forget(self, host: str, scope: str, credentials: Credentials | None) -> None:
        self._tokens.pop((host, scope, credentials), None)

    def cached(self, host: str, scope: str, credentials: Credentials | None) -> str | None:
        entry = self._tokens.get((host, scope, credentials))
        if entry is None:
            return None
        if time.monotonic() >= entry.expires_at:
            del self._tokens[(host, scope, credentials)]
            return None
        return entry.header

    async def prepare(
        self,
        session: aiohttp.ClientSession,
        host: str,
        scope: str,
        credentials: Credentials | None,
        *,
        ssl_context: ssl.SSLContext | bool,
        timeout: float,
        reference: str,
    ) -> str | None:
        """An Authorization header to send up front, if the host's scheme is known."""
        header = self.cached(host, scope, credentials)
        if header is not None:
            return header
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        return await self.answer(
            session,
            host,
            challenge,
            scope,
            credentials,
            ssl_context=ssl_context,
            timeout=timeout,
            reference=reference,
        )

    async def answer(
        self,
        session: aiohttp.ClientSession,
        host: str,
        challenge: Challenge,
        scope: str,
        credentials: Credentials | None,
        *,
        ssl_context: ssl.SSLContext | bool,
        timeout: float,
        reference: str,
    ) -> str | None:
        """The Authorization header answering `challenge`, or None if we have nothing to offer."""
        creds = None if credentials is None or credentials.empty else credentials
        if challenge.scheme == "basic":
            if creds is None or not creds.username:
                return None
            return basic_header(creds.username, creds.password)
        if challenge.scheme != "bearer":
            return None
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryAuthError(
                f"registry {host} sent a bearer challenge without a usable realm ({realm!r})",
                status_code=401,
                host=host,
                reference=reference,
            )
        service = challenge.params.get("service", "")
        scopes = [scope]
        wanted = challenge.params.get("scope", "")
        if wanted and wanted not in scopes:
            scopes.append(wanted)
        token, lifetime = await self._fetch_token(
            session,
            host,
            realm,
            service,
            scopes,
            creds,
            ssl_context=ssl_context,
            timeout=timeout,
            reference=reference,
        )
        header = f"Bearer {token}"
        self._tokens[(host, scope, credentials)] = _Cached(
            header, time.monotonic() + max(0.0, lifetime - EXPIRY_MARGIN)
        )
        return header

    async def _fetch_token(
        self,
        session: aiohttp.ClientSession,
        host: str,
        realm: str,
        service: str,
        scopes: list[str],
        creds: Credentials | None,
        *,
        ssl_context: ssl.SSLContext | bool,
        timeout: float,
        reference: str,
    ) -> tuple[str, float]:
        """(token, lifetime seconds) from the realm: OAuth2 POST with a refresh
        token when we hold an identity token (as containerd does), else GET with
        Basic credentials or anonymously."""
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "service": service,
                "scope": " ".join(scopes),
                "client_id": CLIENT_ID,
                "access_type": "offline",
            }
            status, body = await self._call(
                session,
                "POST",
                realm,
                host,
                data=form,
                ssl_context=ssl_context,
                timeout=timeout,
                reference=reference,
            )
            if status not in (404, 405):
                return self._token_from(status, body, host, realm, creds, reference)
        query = [("service", service)] if service else []
        query += [("scope", s) for s in scopes]
        headers: dict[str, str] = {}
        if creds is not None and creds.username:
            headers["Authorization"] = basic_header(creds.username, creds.password)
            query.append(("account", creds.username))
        status, body = await self._call(
            session,
            "GET",
            realm,
            host,
            params=query,
            headers=headers,
            ssl_context=ssl_context,
            timeout=timeout,
            reference=reference,
        )
        return self._token_from(status, body, host, realm, creds, reference)

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        realm: str,
        host: str,
        *,
        ssl_context: ssl.SSLContext | bool,
        timeout: float,
        reference: str,
        params: list[tuple[str, str]] | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        log_event(
            log,
            "registry token request",
            level=logging.DEBUG,
            host=host,
            realm=realm,
            method=method,
            ref=reference,
        )
        try:
            async with asyncio.timeout(timeout):
                async with session.request(
                    method,
                    realm,
                    params=params,
                    data=data,
                    headers=headers,
                    ssl=ssl_context,
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as resp:
                    body = await resp.content.read(MAX_TOKEN_RESPONSE)
                    return resp.status, body
        except TimeoutError as err:
            raise RegistryUnavailableError(
                f"token server {realm} for registry {host} did not answer within {timeout:g}s",
                host=host,
                reference=reference,
            ) from err
        except aiohttp.ClientError as err:
            raise RegistryUnavailableError(
                f"token server {realm} for registry {host} unreachable: {err}",
                host=host,
                reference=reference,
            ) from err

    @staticmethod
    def _token_from(
        status: int,
        body: bytes,
        host: str,
        realm: str,
        creds: Credentials | None,
        reference: str,
    ) -> tuple[str, float]:
        if status in (401, 403):
            if creds is None:
                raise RegistryAuthError(
                    f"registry {host} requires authentication to pull {reference} "
                    f"(token server answered {status})",
                    status_code=status,
                    host=host,
                    reference=reference,
                )
            raise RegistryAuthError(
                f"registry {host} refused {describe_credentials(creds)} ({status}) "
                f"pulling {reference}",
                status_code=status,
                host=host,
                reference=reference,
            )
        if status != 200:
            error_class = RegistryUnavailableError if status >= 500 else RegistryError
            raise error_class(
                f"token server {realm} for registry {host} answered HTTP {status}",
                host=host,
                reference=reference,
            )
        try:
            data: Any = json.loads(body)
        except ValueError as err:
            raise RegistryError(
                f"token server {realm} for registry {host} sent invalid JSON",
                host=host,
                reference=reference,
            ) from err
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"token server {realm} for registry {host} sent no token",
                host=host,
                reference=reference,
            )
        lifetime = data.get("expires_in")
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return token, float(lifetime)


__all__ = [
    "Authorizer",
    "Challenge",
    "basic_header",
    "describe_credentials",
    "parse_challenges",
]
