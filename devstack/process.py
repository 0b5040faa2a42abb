"""Process plumbing shared by the embedded servers: pid files, ports, detached start, stop.

Every server of the stack is a child process started in its own session (so it outlives the
command that started it), with its output appended to a log file and its pid recorded in a small
JSON file under `<data>/run/`. The pid file also records the port and the process creation time,
so a recycled pid is never mistaken for our server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

LOCALHOST = "127.0.0.1"


class StackError(RuntimeError):
    """A stack operation failed; the message names the cause and the fix."""


class MissingBinaryError(StackError):
    """A server binary (or module) is not installed."""


class PortBusyError(StackError):
    """The port a server should listen on is taken by some other process."""

    def __init__(self, service: str, port: int, owner: str | None) -> None:
        self.service = service
        self.port = port
        self.owner = owner
        who = owner or "another process (could not tell which)"
        super().__init__(
            f"{service}: port {port} on {LOCALHOST} is already in use by {who}. "
            f"Fix: stop that process, or start {service} on another port "
            f"(`python -m devstack up --{service}-port N`), or, if it is a server you want to "
            f"use, point the pipeline at it with its env var instead of starting one."
        )


class NotReadyError(Exception):
    """A server is starting but does not answer yet (retried)."""


class ServerDiedError(StackError):
    """A server exited while we waited for it to become ready."""


@dataclass(frozen=True)
class PidRecord:
    pid: int
    port: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The live process of this record; None when it is gone or the pid was reused."""
        try:
            proc = psutil.Process(self.pid)
            # A pid can be recycled: the creation time tells the original process apart.
            if abs(proc.create_time() - self.create_time) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                reap(self.pid)
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


class PidFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> PidRecord | None:
        try:
            data = json.loads(self.path.read_text())
            return PidRecord(int(data["pid"]), int(data["port"]), float(data["create_time"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def write(self, pid: int, port: int) -> PidRecord:
        record = PidRecord(pid, port, psutil.Process(pid).create_time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record.__dict__))
        tmp.replace(self.path)
        return record

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def live(self) -> tuple[PidRecord, psutil.Process] | None:
        """The recorded process if it still runs; a stale file is removed."""
        record = self.read()
        if record is None:
            return None
        proc = record.process()
        if proc is None:
            self.remove()
            return None
        return record, proc


def reap(pid: int) -> None:
    """Collect the exit status of a child of ours, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT after a clean stop counts as free, as it does for
        # the servers themselves.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def port_owner(port: int) -> str | None:
    """Describe the process listening on `port` ("name (pid N): cmdline"), if the OS tells us."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return None
            try:
                proc = psutil.Process(conn.pid)
                cmdline = " ".join(" ".join(proc.cmdline()).split())
                if len(cmdline) > 160:
                    cmdline = cmdline[:157] + "..."
                return f"{proc.name()} (pid {conn.pid}: {cmdline})"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return f"pid {conn.pid}"
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free right now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOCALHOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def spawn_detached(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start `cmd` in its own session, output appended to `log_path`; return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(
            f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(cmd)}\n".encode()
        )
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI that started it, and Ctrl-C in its shell
            close_fds=True,
            env=env,
        )
    # The server outlives this Popen object on purpose; mark it handled so Python does not warn.
    proc.returncode = 0
    return proc.pid


def wait_ready(
    check: Callable[[], None],
    pid: int,
    what: str,
    log_path: Path,
    timeout: float = 90.0,
) -> None:
    """Call `check` (raises NotReadyError until ready) with backoff; fail fast if `pid` exits."""

    def attempt() -> None:
        if not is_alive(pid):
            raise ServerDiedError(
                f"{what} exited during start-up. Last lines of {log_path}:\n{tail(log_path)}"
            )
        check()

    try:
        for retry in Retrying(
            retry=retry_if_exception_type(NotReadyError),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_delay(timeout),
            reraise=False,
        ):
            with retry:
                attempt()
    except RetryError as exc:
        raise StackError(
            f"{what} did not become ready within {timeout:.0f}s "
            f"({exc.last_attempt.exception()}). See {log_path}:\n{tail(log_path)}"
        ) from None


def is_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            reap(pid)
            return False
        return True
    except psutil.NoSuchProcess:
        return False


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    return not is_alive(pid)


def wait_port_free(port: int, timeout: float, host: str = LOCALHOST) -> bool:
    """Wait until `port` can be bound again: a stopped server's sockets may hold it a moment
    after its process is gone, and a restart on the same port would find it busy."""
    deadline = time.monotonic() + timeout
    while not port_is_free(port, host):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, wait; SIGKILL if it does not exit in time."""
    send_signal(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout):
        send_signal(pid, signal.SIGKILL)
        wait_exit(pid, 10.0)


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
