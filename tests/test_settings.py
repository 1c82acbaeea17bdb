from pathlib import Path

import pytest

from cri_shim import settings
from cri_shim.cli import main


def test_defaults_match_the_documented_production_layout() -> None:
    config = settings.load(None, environ={})
    assert config.server.socket == "/run/cri-shim/cri-shim.sock"
    assert config.server.socket_mode == 0o660
    assert config.containerd.namespace == "k8s.io"
    assert config.containerd.embedded is True


def test_precedence_is_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'state_dir = "/from/file"\n[containerd]\nnamespace = "file"\naddress = "/f.sock"\n'
    )
    config = settings.load(
        path,
        environ={"CRI_SHIM_CONTAINERD_NAMESPACE": "env", "CRI_SHIM_CNI_BIN_DIRS": "/a,/b"},
        overrides={"containerd.address": "/flag.sock"},
    )
    assert config.state_dir == "/from/file"
    assert config.containerd.namespace == "env"
    assert config.containerd.address == "/flag.sock"
    assert config.cni.bin_dirs == ("/a", "/b")


def test_rendered_default_config_reads_back_identically(tmp_path: Path) -> None:
    path = tmp_path / "default.toml"
    path.write_text(settings.render_toml(settings.Settings()))
    assert settings.load(path, environ={}) == settings.Settings()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[containerd]\nadress = 'x'\n", "unknown config key 'containerd.adress'"),
        ("bogus = 1\n", "unknown config key 'bogus'"),
        ("[log]\nlevel = 'loud'\n", "'log.level' must be one of"),
        ("[server]\nsocket_mode = 'rw'\n", "'server.socket_mode': expected int"),
        ("[containerd\n", "not valid TOML"),
        ("containerd = 3\n", "'containerd' must be a table"),
        (
            "[runtime]\ndrain_exec_sync_io_timeout = '10'\n",
            "'runtime.drain_exec_sync_io_timeout' must be a Go duration",
        ),
        ("[runtime.handlers.Bad_Name]\nrunc_binary = '/x'\n", "must be a DNS label"),
        ("[runtime.handlers.runc]\nrunc_binary = '/x'\n", "other than 'runc'"),
        ("[runtime.handlers.new]\n", "'runtime.handlers.new.runc_binary' must not be empty"),
        ("[runtime.handlers.new]\nbinary = '/x'\n", "unknown config key 'runtime.handlers.new"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(settings.SettingsError, match=None) as caught:
        settings.load(path, environ={})
    assert fragment in str(caught.value)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(settings.SettingsError, match="cannot read config file"):
        settings.load(tmp_path / "missing.toml", environ={})


def test_cli_exits_nonzero_with_one_line_on_unknown_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[streaming]\nbind = '0.0.0.0'\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cri-shim: unknown config key 'streaming.bind'"]


def test_config_default_command_prints_loadable_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "default"]) == 0
    out = capsys.readouterr().out
    assert "[containerd]" in out and 'namespace = "k8s.io"' in out


def test_drain_exec_sync_io_timeout_is_containerds_key_and_default() -> None:
    runtime = settings.Settings().runtime
    assert runtime.drain_exec_sync_io_timeout == "0s"
    assert runtime.drain_exec_sync_io_seconds == 0.0
    assert settings.parse_duration("1m30s") == 90.0
    assert settings.parse_duration("0") == 0.0
    assert [settings.format_duration(s) for s in (0, 0.5, 1, 90, 3600)] == [
        "0s",
        "500ms",
        "1s",
        "1m30s",
        "1h0m0s",
    ]


def test_runtime_handlers_read_back_from_rendered_toml(tmp_path: Path) -> None:
    path = tmp_path / "handlers.toml"
    path.write_text("[runtime.handlers.runc-current]\nrunc_binary = '/opt/runc'\n")
    loaded = settings.load(path, environ={})
    assert loaded.runtime.handlers == {
        "runc-current": settings.RuntimeHandlerSettings(runc_binary="/opt/runc")
    }
    again = tmp_path / "again.toml"
    again.write_text(settings.render_toml(loaded))
    assert settings.load(again, environ={}) == loaded
