"""Run Mosquitto as a child process: for `kernex broker run`, `kernex up` and the test fixtures."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from kernex.broker.config import RenderedBroker
from kernex.broker.exceptions import BrokerError, BrokerStartError
from kernex.broker.integrators import PID_NAME
from kernex.broker.pki import INGEST_IDENTITY, FleetPKI
from kernex.kit.logs import get_logger

# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
STARTUP_TIMEOUT_S = 10.0  # a cold start with a large persistence file takes a few seconds
# On SIGTERM Mosquitto writes its persistence file before exiting; give that time, then kill.
STOP_TIMEOUT_S = 10.0
PROBE_INTERVAL_S = 0.05  # fast enough that tests do not wait, slow enough not to spin
PROBE_CONNECT_TIMEOUT_S = 2.0  # one handshake on loopback takes milliseconds
STDERR_TAIL_BYTES = 4096  # enough for the last dozen log lines, which name the cause of a failure
STDERR_TAIL_LINES = 15
LOG_NAME = "mosquitto.log"
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - recognised, not bound to

log = get_logger(__name__)


def find_mosquitto() -> Path:
    """The mosquitto binary: on PATH, or Debian's /usr/sbin location."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    if MOSQUITTO_FALLBACK.is_file():
        return MOSQUITTO_FALLBACK
    raise BrokerStartError("mosquitto not found: install Mosquitto (apt-get install mosquitto)")


class MosquittoProcess:
    """One `mosquitto -c <conf>` child, ready once it completes a TLS handshake on its port.

    A context manager: entering starts the broker and waits until it is ready, leaving stops it.
    It may be started again after a stop, but not while running.
    """

    def __init__(
        self,
        conf_path: Path,
        port: int,
        *,
        probe_context: ssl.SSLContext,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        inherit_output: bool = False,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        binary: Path | None = None,
    ) -> None:
        self.conf_path = conf_path
        self._port = port
        self.host = host
        self._probe_context = probe_context
        # Output goes to a log file so a failed start can quote it; `kernex broker run` shows
        # it on the terminal instead (inherit_output).
        self.log_path: Path | None = None if inherit_output else (log_path or conf_path.parent / LOG_NAME)
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.returncode: int | None = None

    @classmethod
    def for_rendered(cls, rendered: RenderedBroker, pki: FleetPKI, *, inherit_output: bool = False) -> Self:
        """A process for a rendered config, probing readiness with the ingest service identity."""
        host = "127.0.0.1" if rendered.bind_address in WILDCARD_ADDRESSES else rendered.bind_address
        return cls(
            rendered.conf_path,
            rendered.port,
            probe_context=pki.client_ssl_context(INGEST_IDENTITY),
            host=host,
            inherit_output=inherit_output,
        )

    @property
    def port(self) -> int:
        """The TLS port the broker listens on."""
        return self._port

    @property
    def pid(self) -> int:
        """The broker's process id."""
        if self._proc is None:
            raise BrokerError("mosquitto is not running")
        return self._proc.pid

    @property
    def is_running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start Mosquitto and wait until it accepts TLS connections; BrokerStartError if it does not."""
        if self._proc is not None:
            raise BrokerError("mosquitto is already running")
        binary = self._binary or find_mosquitto()
        if self.log_path is not None:
            self._log_file = self.log_path.open("wb")
        try:
            # A session of its own: a Ctrl-C on the terminal reaches us, and we stop the broker
            # in order (SIGTERM, then wait for it to save its persistence file).
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [str(binary), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT if self._log_file else None,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise BrokerStartError(f"cannot run {binary}: {exc.strerror}") from None
        self.returncode = None
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        # For `kernex integrations`, which reloads this broker after changing its ACL.
        self._pid_path.write_text(f"{self._proc.pid}\n", encoding="ascii")
        log.info("mosquitto started", pid=self._proc.pid, port=self._port, conf=str(self.conf_path))

    @property
    def _pid_path(self) -> Path:
        return self.conf_path.parent / PID_NAME

    def stop(self) -> None:
        """SIGTERM, wait, and SIGKILL if Mosquitto has not exited in time. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self._stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("mosquitto ignored SIGTERM; killing it", pid=proc.pid)
                    proc.kill()
                    proc.wait()
            self.returncode = proc.returncode
        finally:
            self._proc = None
            self._pid_path.unlink(missing_ok=True)
            self._close_log()

    def reload(self) -> None:
        """Ask Mosquitto to reload its config and ACL file (SIGHUP); existing connections stay up."""
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("mosquitto is not running")
        self._proc.send_signal(signal.SIGHUP)

    def wait(self, timeout: float | None = None) -> int:
        """Block until Mosquitto exits; its exit status."""
        if self._proc is None:
            raise BrokerError("mosquitto is not running")
        return self._proc.wait(timeout)

    def output_tail(self) -> str:
        """The last lines Mosquitto logged, or "" when its output is not captured."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - STDERR_TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout_s
        last_error = "no attempt made"
        while True:
            status = self._proc.poll()
            if status is not None:
                raise BrokerStartError(f"mosquitto exited with status {status} while starting{self._tail()}")
            # Probe only once the port is bound by our child: another broker of the same fleet
            # holding the port would pass the TLS probe while ours fails to bind and exits.
            if not _listens_on(self._proc.pid, self._port):
                last_error = f"port {self._port} is not bound by mosquitto (pid {self._proc.pid}) yet"
            else:
                try:
                    self._probe()
                except OSError as exc:  # a TLS error too: ssl.SSLError is an OSError
                    last_error = str(exc) or type(exc).__name__
                else:
                    return
            if time.monotonic() >= deadline:
                raise BrokerStartError(
                    f"mosquitto did not accept TLS connections on {self.host}:{self._port} within "
                    f"{self._startup_timeout_s:g} s (last error: {last_error}){self._tail()}"
                )
            time.sleep(PROBE_INTERVAL_S)

    def _probe(self) -> None:
        """One full TLS handshake (certificate chain and host name checked), then close."""
        with (
            socket.create_connection((self.host, self._port), timeout=PROBE_CONNECT_TIMEOUT_S) as sock,
            self._probe_context.wrap_socket(sock, server_hostname=self.host) as tls,
        ):
            # close_notify, so Mosquitto logs an orderly close rather than an OpenSSL EOF error.
            try:
                tls.unwrap()
            except OSError as exc:
                # The completed handshake is what proves readiness; an abrupt close is harmless.
                log.debug("readiness probe closed abruptly", error=str(exc))

    def _tail(self) -> str:
        tail = self.output_tail()
        if tail:
            return f"; mosquitto said:\n{tail}"
        return "" if self.log_path is not None else " (its output is above)"

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


_TCP_LISTEN = "0A"  # the `st` column of /proc/net/tcp for a listening socket


def _listens_on(pid: int, port: int) -> bool:
    """True if process pid holds a listening TCP socket on port (Linux /proc).

    Where /proc cannot answer (no procfs, or no permission on the child's descriptors) it
    returns True and leaves readiness to the TLS probe alone.
    """
    if not Path("/proc/self/fd").is_dir():
        return True
    inodes = _listening_socket_inodes(port)
    if not inodes:
        return False
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except PermissionError:
        return True
    except FileNotFoundError:
        return False  # the child is gone; the caller's poll() reports how it exited
    for fd in descriptors:
        try:
            if str(fd.readlink()) in inodes:
                return True
        except FileNotFoundError:
            continue  # the descriptor closed while we were looking
    return False


def _listening_socket_inodes(port: int) -> set[str]:
    """The `socket:[inode]` names of the TCP sockets listening on port, from /proc/net."""
    inodes = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue  # tcp6 is absent when IPv6 is disabled
        with table.open(encoding="ascii") as handle:
            next(handle)  # the header line
            for line in handle:
                fields = line.split()
                if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    return inodes
