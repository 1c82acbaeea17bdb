"""A private containerd the shim starts and supervises when none is reachable.

Everything it owns lives under one directory (root, state, sockets, log), and
its built-in CRI plugin is disabled so the shim is the only CRI server talking
to it. Used by `cri-shim serve` for try-outs and by the test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
from pathlib import Path

from cri_shim.logs import log_event

log = logging.getLogger(__name__)

CRI_PLUGIN = "io.containerd.grpc.v1.cri"


class EmbeddedContainerdError(RuntimeError):
    pass


def render_config(base: Path) -> str:
    """containerd config (version 2, as 1.6 and 1.7 read it) confined to `base`."""
    return "\n".join(
        [
            "version = 2",
            f'root = "{base / "root"}"',
            f'state = "{base / "state"}"',
            f'disabled_plugins = ["{CRI_PLUGIN}"]',
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
        await asyncio.to_thread(self._prepare)
        self._stopping = False
        await self._launch(path)
        if self.restart:
            self._supervisor = asyncio.create_task(
                self._supervise(path), name="containerd-supervisor"
            )

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.base))
        sock = Path(self.address)
        if sock.exists() or sock.is_symlink():
            sock.unlink()

    async def _launch(self, path: str) -> None:
        logfile = await asyncio.to_thread(self.log_path.open, "ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                path,
                "--config",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
            )
        finally:
            logfile.close()
        log_event(log, "private containerd started", pid=self.process.pid, address=self.address)
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
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
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
