"""`cri-shim` command line: serve, check, config default."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from cri_shim import __version__, settings
from cri_shim.logs import configure

# Flags that override a settings key; each maps to its dotted TOML key.
_FLAG_KEYS = {
    "socket": "server.socket",
    "containerd_address": "containerd.address",
    "containerd_namespace": "containerd.namespace",
    "state_dir": "state_dir",
    "streaming_address": "streaming.address",
    "streaming_port": "streaming.port",
    "cni_conf_dir": "cni.conf_dir",
    "log_level": "log.level",
    "log_format": "log.format",
    "metrics_address": "metrics.address",
    "metrics_port": "metrics.port",
}


def _add_settings_flags(command: argparse.ArgumentParser) -> None:
    """The flags `serve` and `check` share, so `check` sees what `serve` would use."""
    command.add_argument("--config", type=Path, help="TOML config file")
    command.add_argument("--socket", help="listen socket path")
    command.add_argument("--containerd-address", help="containerd gRPC socket")
    command.add_argument("--containerd-namespace", help="containerd namespace (default k8s.io)")
    command.add_argument("--state-dir", help="directory for the shim's own state")
    command.add_argument("--streaming-address", help="bind address of the streaming server")
    command.add_argument("--streaming-port", type=int, help="port of the streaming server")
    command.add_argument("--cni-conf-dir", help="CNI network config directory")
    command.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    command.add_argument("--log-format", choices=["text", "json"])
    embedded = command.add_mutually_exclusive_group()
    embedded.add_argument(
        "--embedded-containerd",
        dest="embedded",
        action="store_true",
        default=None,
        help="start a private containerd when none is reachable (default)",
    )
    embedded.add_argument(
        "--no-embedded-containerd",
        dest="embedded",
        action="store_false",
        help="never start a private containerd (production)",
    )
    command.add_argument("--metrics-address", help="bind address of /metrics and /healthz")
    command.add_argument("--metrics-port", type=int, help="port of /metrics and /healthz (0: any)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cri-shim", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cri-shim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the CRI on a unix socket")
    _add_settings_flags(serve)

    check = commands.add_parser(
        "check", help="diagnose whether this node can run pods (exits 1 on any FAIL)"
    )
    _add_settings_flags(check)
    check.add_argument(
        "--timeout", type=float, default=5.0, help="seconds each check may take (default 5)"
    )

    config = commands.add_parser("config", help="configuration helpers")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("default", help="print the default config as TOML")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    found = {
        key: getattr(args, flag)
        for flag, key in _FLAG_KEYS.items()
        if getattr(args, flag, None) is not None
    }
    if args.embedded is not None:
        found["containerd.embedded"] = args.embedded
    return found


async def _serve(config: settings.Settings) -> int:
    from cri_shim.server import Shim  # heavy imports only for serving

    shim = Shim(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await shim.start()
    except BaseException:
        await shim.stop()
        raise
    await stop.wait()
    await shim.stop()
    return 0


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep serving without it
        result: int = asyncio.run(coro)
        return result
    result = uvloop.run(coro)
    return int(result)


async def _check(config: settings.Settings, timeout: float) -> int:
    from cri_shim.check import exit_code, run_checks

    results = await run_checks(config, timeout=timeout)
    for result in results:
        print(result.line, flush=True)
    return exit_code(results)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        sys.stdout.write(settings.render_toml(settings.Settings()))
        return 0
    try:
        config = settings.load(args.config, overrides=_overrides(args))
    except settings.SettingsError as err:
        print(f"cri-shim: {err}", file=sys.stderr)
        return 2
    configure(config.log.level, config.log.format)
    if args.command == "check":
        return _run(_check(config, args.timeout))
    try:
        return _run(_serve(config))
    except settings.SettingsError as err:
        print(f"cri-shim: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one clear line for the operator, details in the log
        import logging

        logging.getLogger("cri_shim").exception("fatal error")
        print(f"cri-shim: {err}", file=sys.stderr)
        return 1
