"""A private containerd the shim starts and supervises when none is reachable.

Everything it owns lives under one directory (root, state, sockets, log), and
its built-in CRI plugin is disabled so the shim is the only CRI server talking
to it. Used by `cri-shim serve` for try-outs and by the test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

from cri_shim.concurrency import stop_task
from cri_shim.containerd.version import parse_version, unsupported_reason, version_field
from cri_shim.logs import log_event

log = logging.getLogger(__name__)

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
# containerd 2.x splits its CRI into these (plus the streaming server, CRI_PLUGIN), and
# turns NRI on by default with a socket at a fixed host path; none of it is the shim's.
CRI_PLUGINS_V2 = ("io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images", CRI_PLUGIN)
NRI_PLUGIN_V2 = "io.containerd.nri.v1.nri"


class EmbeddedContainerdError(RuntimeError):
    pass


async def read_binary_version(path: str, timeout: float = 30.0) -> str:
    """`<path> --version`'s output ("containerd github.com/containerd/containerd/v2
    v2.4.2 <rev>"), read without blocking the loop."""
    process = await asyncio.create_subprocess_exec(
        path,
        "--version",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise TimeoutError(f"{path} --version did not answer within {timeout:g}s") from None
    text = output.decode(errors="replace").strip()
    if process.returncode != 0:
        raise OSError(f"{path} --version exited {process.returncode}: {text}")
    return text


def render_config(base: Path, major: int = 1) -> str:
    """containerd config confined to `base`: version 2 for 1.6/1.7, version 3 for 2.x
    (every 2.x reads it; 2.4, whose own format is 4, migrates it and logs a warning)."""
    disabled = (CRI_PLUGIN,) if major < 2 else (*CRI_PLUGINS_V2, NRI_PLUGIN_V2)
    return "\n".join(
        [
            f"version = {2 if major < 2 else 3}",
            f'root = "{base / "root"}"',
            f'state = "{base / "state"}"',
            "disabled_plugins = [{}]".format(", ".join(f'"{p}"' for p in disabled)),
            "",
            "[grpc]",
            f'  address = "{base / "containerd.sock"}"',
            "",
            "[ttrpc]",
            f'  address = "{base / "containerd.sock.ttrpc"}"',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{base / "opt"}"',
            "",
        ]
    )


class EmbeddedContainerd:
    """Starts containerd, restarts it with backoff if it dies, stops it on request."""

    def __init__(
        self,
        base: Path,
        *,
        binary: str = "containerd",
        restart: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self.base = base
        self.binary = binary
        self.restart = restart
        self.start_timeout = start_timeout
        self.process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0
        # `containerd --version`'s version field, read at start (e.g. "v2.4.2", "1.6.20~ds1").
        self.version = ""
        self.major = 1

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @staticmethod
    def find_binary(binary: str) -> str | None:
        return shutil.which(binary)

    async def start(self) -> None:
        path = self.find_binary(self.binary)
        if path is None:
            raise EmbeddedContainerdError(
                f"cannot start a private containerd: {self.binary!r} is not installed"
            )
        self.version, self.major = await self._read_version(path)
        await asyncio.to_thread(self._prepare)
        self._stopping = False
        await self._launch(path)
        if self.restart:
            self._supervisor = asyncio.create_task(
                self._supervise(path), name="containerd-supervisor"
            )

    @staticmethod
    async def _read_version(path: str) -> tuple[str, int]:
        """The binary's version: 2.x needs another config format than 1.6/1.7."""
        try:
            text = await read_binary_version(path)
        except (OSError, TimeoutError) as err:
            raise EmbeddedContainerdError(f"cannot start a private containerd: {err}") from err
        version = version_field(text) or ""
        parsed = parse_version(text)
        problem = unsupported_reason(version or text)
        if problem is not None or parsed is None:
            raise EmbeddedContainerdError(
                f"cannot start a private containerd from {path}: {problem}"
            )
        return version, parsed[0]

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.base, self.major))
        sock = Path(self.address)
        if sock.exists() or sock.is_symlink():
            sock.unlink()

    async def _launch(self, path: str) -> None:
        logfile = await asyncio.to_thread(self.log_path.open, "ab")
        # containerd finds containerd-shim-runc-v2 on its PATH: the one beside this binary
        # (a containerd build ships its own shim) must win over any other version's.
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(path).parent), env.get("PATH", "")])
        try:
            self.process = await asyncio.create_subprocess_exec(
                path,
                "--config",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                env=env,
            )
        finally:
            logfile.close()
        log_event(
            log,
            "private containerd started",
            pid=self.process.pid,
            address=self.address,
            version=self.version,
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        # Imported here: the client pulls in the generated stubs, which the
        # config-only code paths (`cri-shim config default`) do not need.
        from cri_shim.containerd.client import ContainerdClient

        client = ContainerdClient(self.address, "default")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        try:
            while loop.time() < deadline:
                if self.process is not None and self.process.returncode is not None:
                    raise EmbeddedContainerdError(
                        f"private containerd exited with {self.process.returncode}; "
                        f"see {self.log_path}"
                    )
                if await client.is_serving(timeout=1.0):
                    return
                await asyncio.sleep(0.1)
        finally:
            client.close()
        raise EmbeddedContainerdError(
            f"private containerd did not answer within {self.start_timeout:.0f}s; "
            f"see {self.log_path}"
        )

    async def _supervise(self, path: str) -> None:
        backoff = 0.5
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            log_event(
                log,
                "private containerd exited; restarting",
                level=logging.WARNING,
                exit_code=code,
                backoff_s=backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            try:
                await self._launch(path)
                self.restarts += 1
                backoff = 0.5
            except EmbeddedContainerdError as err:
                log_event(log, "private containerd restart failed", level=logging.ERROR, error=err)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to containerd itself (tests use this to simulate a crash)."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        await stop_task(self._supervisor)
        self._supervisor = None
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
        log_event(log, "private containerd stopped", pid=process.pid)
