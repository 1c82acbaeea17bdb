"""The `[registry]` settings section and how it becomes an ordered endpoint list."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri_shim import settings
from cri_shim.registry.errors import RegistryError
from cri_shim.registry.hosts import Endpoint, RegistryHosts, api_url, parse_duration

CONFIG = """
[registry]
config_path = "/etc/containerd/certs.d"
insecure_registries = ["build.internal:5000"]
stall_timeout = 60.0
max_concurrent_downloads = 5

[registry.mirrors."docker.io"]
endpoint = ["https://mirror.gcr.io", "http://127.0.0.1:5000"]

[registry.mirrors."*"]
endpoint = ["https://catch-all.example"]

[registry.configs."127.0.0.1:5001".auth]
username = "x"
password = "p\\"w"

[registry.configs."registry.example.com".tls]
ca_file = "/etc/ssl/example-ca.pem"
insecure_skip_verify = true
"""


def load_text(tmp_path: Path, text: str) -> settings.Settings:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return settings.load(path, environ={})


def test_registry_section_loads_and_round_trips(tmp_path: Path) -> None:
    config = load_text(tmp_path, CONFIG).registry
    assert config.config_path == "/etc/containerd/certs.d"
    assert config.insecure_registries == ("build.internal:5000",)
    assert config.stall_timeout == 60.0 and config.max_concurrent_downloads == 5
    assert config.mirrors["docker.io"].endpoint == (
        "https://mirror.gcr.io",
        "http://127.0.0.1:5000",
    )
    assert config.configs["127.0.0.1:5001"].auth.password == 'p"w'
    assert config.configs["registry.example.com"].tls.insecure_skip_verify is True
    assert config.configs["registry.example.com"].auth == settings.RegistryAuthSettings()
    full = load_text(tmp_path, CONFIG)
    rendered = settings.render_toml(full)
    assert '[registry.mirrors."docker.io"]' in rendered
    assert '[registry.configs."127.0.0.1:5001".auth]' in rendered
    assert load_text(tmp_path, rendered) == full


def test_registry_defaults() -> None:
    config = settings.Settings().registry
    assert config.stall_timeout == 300.0
    assert config.max_concurrent_downloads == 3
    assert config.mirrors == {} and config.configs == {}
    assert "[registry]" in settings.render_toml(settings.Settings())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            '[registry.mirrors."docker.io"]\nendpoints = ["x"]\n',
            "unknown config key 'registry.mirrors.\"docker.io\".endpoints'",
        ),
        (
            '[registry.configs."h:1".tls]\nca = "x"\n',
            "unknown config key 'registry.configs.\"h:1\".tls.ca'",
        ),
        ("[registry.configs.plain.auth]\nuser = 'x'\n", "'registry.configs.plain.auth.user'"),
        (
            '[registry.mirrors]\n"docker.io" = 3\n',
            "'registry.mirrors.\"docker.io\"' must be a table",
        ),
        ("[registry]\nmirrors = 3\n", "'registry.mirrors' must be a table"),
        ("[registry]\nstall_timeout = 'soon'\n", "'registry.stall_timeout': expected float"),
    ],
)
def test_bad_registry_config_names_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(settings.SettingsError) as caught:
        load_text(tmp_path, text)
    assert fragment in str(caught.value)


def test_scalars_come_from_env_but_tables_only_from_the_file() -> None:
    config = settings.load(
        None,
        environ={"CRI_SHIM_REGISTRY_STALL_TIMEOUT": "5", "CRI_SHIM_REGISTRY_CONFIG_PATH": "/x"},
    )
    assert config.registry.stall_timeout == 5.0 and config.registry.config_path == "/x"
    assert "registry.stall_timeout" in settings.known_keys()
    assert "registry.mirrors" not in settings.known_keys()


def test_secrets_are_redacted_for_status_info(tmp_path: Path) -> None:
    shown = settings.as_dict(load_text(tmp_path, CONFIG))
    auth = shown["registry"]["configs"]["127.0.0.1:5001"]["auth"]
    assert auth == {"username": "x", "password": "<redacted>", "auth": "", "identitytoken": ""}


# ------------------------------------------------------------------ endpoints


def hosts(**fields: object) -> RegistryHosts:
    return RegistryHosts(settings.RegistrySettings(**fields))  # type: ignore[arg-type]


def urls(endpoints: list[Endpoint]) -> list[str]:
    return [e.url for e in endpoints]


async def test_defaults_without_configuration() -> None:
    h = hosts(insecure_registries=("build.internal:5000",))
    (hub,) = await h.endpoints("docker.io")
    assert hub.url == "https://registry-1.docker.io/v2" and not hub.http_fallback
    assert not hub.mirror and not hub.tls.skip_verify
    (k8s,) = await h.endpoints("registry.k8s.io")
    assert k8s.url == "https://registry.k8s.io/v2" and not k8s.http_fallback
    # Loopback with a port, and insecure registries: https unverified, then plain http.
    for domain in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "build.internal:5000"):
        (endpoint,) = await h.endpoints(domain)
        assert endpoint.url == f"https://{domain}/v2"
        assert endpoint.http_fallback and endpoint.tls.skip_verify, domain
    (plain,) = await h.endpoints("localhost")
    assert not plain.http_fallback


async def test_inline_mirrors_then_the_registry() -> None:
    h = hosts(
        mirrors={
            "docker.io": settings.RegistryMirrorSettings(
                endpoint=("https://mirror.gcr.io", "http://127.0.0.1:5000/", "mirror.example/sub")
            ),
            "*": settings.RegistryMirrorSettings(endpoint=("https://all.example",)),
            "self.example": settings.RegistryMirrorSettings(
                endpoint=("http://m.example", "https://self.example")
            ),
        },
        configs={
            "registry-1.docker.io": settings.RegistryHostSettings(
                auth=settings.RegistryAuthSettings(username="hub")
            ),
            "mirror.gcr.io": settings.RegistryHostSettings(
                tls=settings.RegistryTlsSettings(ca_file="/ca.pem")
            ),
        },
    )
    endpoints = await h.endpoints("docker.io")
    assert urls(endpoints) == [
        "https://mirror.gcr.io/v2",
        "http://127.0.0.1:5000/v2",
        "https://mirror.example/sub/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert [e.mirror for e in endpoints] == [True, True, True, False]
    assert endpoints[0].tls.ca_files == ("/ca.pem",)
    assert endpoints[0].auth is None  # upstream credentials never go to a mirror
    assert endpoints[-1].auth is not None and endpoints[-1].auth.username == "hub"
    assert urls(await h.endpoints("quay.io")) == [
        "https://all.example/v2",
        "https://quay.io/v2",
    ]
    # A registry listed among its own mirrors keeps its place and is not added again.
    assert urls(await h.endpoints("self.example")) == [
        "http://m.example/v2",
        "https://self.example/v2",
    ]
    with pytest.raises(RegistryError, match="must be an http:// or https:// URL"):
        await hosts(
            mirrors={"x.io": settings.RegistryMirrorSettings(endpoint=("ftp://m",))}
        ).endpoints("x.io")


async def test_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "docker.io"
    d.mkdir()
    (d / "hosts.toml").write_text(
        """
server = "https://registry-1.docker.io"
ca = "hub-ca.crt"

[host."https://mirror.example/base"]
  capabilities = ["pull"]
  ca = ["/abs/ca.pem", "rel.pem"]
  client = [["c.cert", "c.key"]]
  skip_verify = true
  dial_timeout = "1.5s"
  [host."https://mirror.example/base".header]
    x-custom = "1"
    x-multi = ["a", "b"]

[host."http://raw.example/api"]
  override_path = true

[host."plain.example:5000"]
  client = "both.pem"
"""
    )
    mirror, raw, plain, server = await hosts(config_path=str(tmp_path)).endpoints("docker.io")
    assert mirror.url == "https://mirror.example/base/v2"
    assert mirror.capabilities == frozenset({"pull"})
    assert mirror.tls.ca_files == ("/abs/ca.pem", str(d / "rel.pem"))
    assert mirror.tls.client_pairs == ((str(d / "c.cert"), str(d / "c.key")),)
    assert mirror.tls.skip_verify and mirror.dial_timeout == 1.5
    assert mirror.headers == (("x-custom", "1"), ("x-multi", "a"), ("x-multi", "b"))
    assert mirror.mirror
    assert raw.url == "http://raw.example/api"
    assert raw.capabilities == frozenset({"pull", "resolve", "push"})
    assert plain.url == "https://plain.example:5000/v2"
    assert plain.tls.client_pairs == ((str(d / "both.pem"), ""),)
    assert server.url == "https://registry-1.docker.io/v2" and not server.mirror
    assert server.tls.ca_files == (str(d / "hub-ca.crt"),)


async def test_hosts_dir_fallbacks(tmp_path: Path) -> None:
    # No hosts.toml: Docker certs.d style files apply to the registry itself.
    d = tmp_path / "certs.example"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "orphan.cert"):
        (d / name).write_text("")
    h = hosts(config_path=str(tmp_path))
    (endpoint,) = await h.endpoints("certs.example")
    assert endpoint.url == "https://certs.example/v2"
    assert endpoint.tls.ca_files == (str(d / "ca.crt"),)
    assert endpoint.tls.client_pairs == ((str(d / "client.cert"), str(d / "client.key")),)
    # No directory and no _default: inline config, then the registry.
    assert urls(await h.endpoints("other.example")) == ["https://other.example/v2"]
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://cache.local"]\n')
    assert urls(await h.endpoints("other.example")) == [
        "http://cache.local/v2",
        "https://other.example/v2",
    ]
    # Edits are picked up without a restart.
    (tmp_path / "_default" / "hosts.toml").write_text('server = "http://only.local"\n')
    assert urls(await h.endpoints("other.example")) == ["http://only.local/v2"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("server = [", "is not valid TOML"),
        ("server = 3", "`server` must be a URL string"),
        ('[host."https://m"]\ncapabilities = "pull"', "capabilities must be a list"),
        ('[host."https://m"]\nskip_verify = "yes"', "skip_verify must be true or false"),
        ('[host."https://m"]\nca = 3', "ca must be a path or a list of paths"),
        ('[host."https://m"]\ndial_timeout = "soon"', "invalid duration 'soon'"),
    ],
)
async def test_bad_hosts_toml(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "bad.example").mkdir()
    (tmp_path / "bad.example" / "hosts.toml").write_text(text)
    with pytest.raises(RegistryError) as caught:
        await hosts(config_path=str(tmp_path)).endpoints("bad.example")
    assert fragment in str(caught.value)
    assert str(tmp_path / "bad.example" / "hosts.toml") in str(caught.value)


def test_helpers() -> None:
    assert api_url("https://h") == "https://h/v2"
    assert api_url("https://h/v2/") == "https://h/v2"
    assert api_url("https://h/x") == "https://h/x/v2"
    assert api_url("https://h/x", override_path=True) == "https://h/x"
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    for bad in ("", "5", "5 s", "s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
