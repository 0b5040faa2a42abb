"""The life cycle every embedded server shares: start (idempotent), stop, kill, status.

A subclass says how to build its command line, how to tell it is ready, and how to ask it to
shut down cleanly; this class does the pid file, the port check, the log and the waiting.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from devstack.process import (
    LOCALHOST,
    PidFile,
    PortBusyError,
    port_is_free,
    port_owner,
    send_signal,
    spawn_detached,
    terminate,
    wait_exit,
    wait_port_free,
    wait_ready,
)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    port: int
    url: str
    note: str = ""


@dataclass(frozen=True)
class Outcome:
    """What `start`/`stop` did, in words the CLI prints."""

    name: str
    action: str  # started, already running, stopped, not running
    pid: int | None
    url: str


class Service(ABC):
    name: str
    start_timeout: float = 90.0
    stop_timeout: float = 60.0

    def __init__(self, data_dir: Path, port: int, host: str = LOCALHOST) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.pidfile = PidFile(self.data_dir / "run" / f"{self.name}.pid")

    # --- what a subclass provides -------------------------------------------------------------
    @abstractmethod
    def url_at(self, port: int) -> str:
        """The connection string of this server when it listens on `port`."""

    @property
    def url(self) -> str:
        return self.url_at(self.port)

    @property
    @abstractmethod
    def log_path(self) -> Path: ...

    @abstractmethod
    def command(self) -> list[str]:
        """The command line; raises MissingBinaryError when the binary is not installed."""

    @abstractmethod
    def check_ready(self) -> None:
        """Raise NotReadyError until the server answers."""

    def after_start(self) -> None:  # noqa: B027 - optional hook
        """One-time setup once the server answers (e.g. initiate the replica set)."""

    def request_shutdown(self, port: int) -> None:
        """Ask the server on `port` to shut down cleanly; default: SIGTERM via `stop`."""
        raise NotImplementedError

    def prepare_dirs(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    # --- life cycle --------------------------------------------------------------------------
    def ensure_port_free(self) -> None:
        """Raise PortBusyError unless this service is running or its port is free."""
        if self.pidfile.live() is None and not port_is_free(self.port, self.host):
            raise PortBusyError(self.name, self.port, port_owner(self.port))

    def start(self) -> Outcome:
        live = self.pidfile.live()
        if live is not None:
            record, _ = live
            return Outcome(self.name, "already running", record.pid, self.url_at(record.port))
        cmd = self.command()  # before the port check: a missing binary is the first thing to fix
        self.ensure_port_free()
        self.prepare_dirs()
        pid = spawn_detached(cmd, self.log_path, env=self.child_env())
        self.pidfile.write(pid, self.port)
        try:
            wait_ready(self.check_ready, pid, self.name, self.log_path, self.start_timeout)
            self.after_start()
        except BaseException:
            # Never leave a half-started server behind.
            terminate(pid, timeout=10.0)
            self.pidfile.remove()
            raise
        return Outcome(self.name, "started", pid, self.url)

    def child_env(self) -> dict[str, str] | None:
        return None

    def stop(self) -> Outcome:
        live = self.pidfile.live()
        if live is None:
            return Outcome(self.name, "not running", None, self.url)
        record, _ = live
        try:
            self.request_shutdown(record.port)
        except NotImplementedError:
            send_signal(record.pid, signal.SIGTERM)
        except Exception:
            # The clean path failed (server hung, auth, ...): fall back to SIGTERM.
            send_signal(record.pid, signal.SIGTERM)
        if not wait_exit(record.pid, self.stop_timeout):
            terminate(record.pid, timeout=10.0)
        self.pidfile.remove()
        wait_port_free(record.port, 10.0, self.host)  # so that a restart finds it free
        return Outcome(self.name, "stopped", record.pid, self.url)

    def kill(self) -> Outcome:
        """SIGKILL, no clean shutdown: for fault-injection tests."""
        live = self.pidfile.live()
        if live is None:
            return Outcome(self.name, "not running", None, self.url)
        record, _ = live
        send_signal(record.pid, signal.SIGKILL)
        wait_exit(record.pid, 10.0)
        self.pidfile.remove()
        wait_port_free(record.port, 10.0, self.host)
        return Outcome(self.name, "killed", record.pid, self.url)

    def status(self) -> ServiceStatus:
        live = self.pidfile.live()
        if live is not None:
            record, _ = live
            note = "" if record.port == self.port else f"started on port {record.port}"
            url = self.url_at(record.port)
            return ServiceStatus(self.name, True, record.pid, record.port, url, note)
        note = ""
        if not port_is_free(self.port, self.host):
            note = f"port taken by {port_owner(self.port) or 'another process'}"
        return ServiceStatus(self.name, False, None, self.port, self.url, note)
