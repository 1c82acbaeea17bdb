import json
from pathlib import Path

import pytest

from cri_shim.network.cni_config import CniConfigError, load_network_config
from cri_shim.network.readiness import NetworkReadiness


def write(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))


@pytest.fixture()
def bin_dir(tmp_path: Path) -> Path:
    plugins = tmp_path / "bin"
    plugins.mkdir()
    for name in ("bridge", "host-local", "loopback", "portmap"):
        (plugins / name).write_text("")
    return plugins


def test_first_valid_config_in_lexical_order_wins(tmp_path: Path, bin_dir: Path) -> None:
    conf = tmp_path / "net.d"
    conf.mkdir()
    write(
        conf / "20-b.conflist",
        {"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "bridge"}]},
    )
    write(conf / "10-a.conf", {"cniVersion": "0.4.0", "name": "a", "type": "bridge"})
    (conf / "00-ignored.txt").write_text("not a config")
    config = load_network_config(conf, [str(bin_dir)])
    assert (config.name, config.plugin_types) == ("a", ("bridge",))


def test_invalid_configs_are_explained(tmp_path: Path, bin_dir: Path) -> None:
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "10-broken.conflist").write_text("{nope")
    write(conf / "20-empty.conflist", {"name": "x", "plugins": []})
    write(conf / "30-missing.conflist", {"name": "y", "plugins": [{"type": "flannel"}]})
    with pytest.raises(CniConfigError) as caught:
        load_network_config(conf, [str(bin_dir)])
    text = str(caught.value)
    assert "10-broken.conflist: not readable JSON" in text
    assert "'plugins' must be a non-empty list" in text
    assert "plugin binary 'flannel' not found" in text


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CniConfigError, match="does not exist"):
        load_network_config(tmp_path / "absent")


async def test_readiness_follows_config_written_after_start(tmp_path: Path, bin_dir: Path) -> None:
    conf = tmp_path / "net.d"
    conf.mkdir()
    readiness = NetworkReadiness(conf, [str(bin_dir)])
    await readiness.refresh()
    assert not readiness.ready
    assert "no network config found" in readiness.message
    write(
        conf / "10-net.conflist",
        {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]},
    )
    await readiness.refresh()
    assert readiness.ready and readiness.message == ""
    (conf / "10-net.conflist").unlink()
    await readiness.refresh()
    assert not readiness.ready
