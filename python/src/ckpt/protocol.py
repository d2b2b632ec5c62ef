"""The contract between the supervisor and a job (``docs/protocol.md``): environment variable
names and the JSON datagrams a client sends. Mirrors ``src/protocol.rs``."""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any, Dict, Optional

__all__ = [
    "PROTOCOL_VERSION",
    "ENV_DIR",
    "ENV_RESTORE",
    "ENV_RESTORE_CHECK",
    "ENV_RESTORE_SEQ",
    "ENV_RESTORE_STEP",
    "ENV_RESTART_COUNT",
    "ENV_SOCKET",
    "ENV_SIGNAL",
    "ENV_PROTOCOL",
    "ENV_SUPERVISOR_PID",
    "ENV_START",
    "START_FRESH",
    "START_RESUME",
    "START_BRANCH",
    "RESTORE_CHECK_FULL",
    "RESTORE_CHECK_CLIENT",
    "SUPERVISOR_ENV",
    "MAX_MESSAGE_BYTES",
    "env",
    "parse_signal",
    "Channel",
]

#: Protocol version spoken by this client (``CKPT_PROTOCOL``, every message's ``v``).
PROTOCOL_VERSION = 1

ENV_DIR = "CKPT_DIR"
ENV_RESTORE = "CKPT_RESTORE"
#: How the supervisor checked the restore checkpoint before the launch (``ckpt run
#: --restore-check``): ``full`` (every byte) or ``client`` (the manifest and the member sizes
#: only: the client checksums every byte it reads and reports damage with a
#: ``restore_failed`` message). Set with ``CKPT_RESTORE``, empty on a fresh start; absent or
#: any other value means ``full``.
ENV_RESTORE_CHECK = "CKPT_RESTORE_CHECK"
RESTORE_CHECK_FULL = "full"
RESTORE_CHECK_CLIENT = "client"
ENV_RESTORE_SEQ = "CKPT_RESTORE_SEQ"
ENV_RESTORE_STEP = "CKPT_RESTORE_STEP"
ENV_RESTART_COUNT = "CKPT_RESTART_COUNT"
ENV_SOCKET = "CKPT_SOCKET"
ENV_SIGNAL = "CKPT_SIGNAL"
ENV_PROTOCOL = "CKPT_PROTOCOL"
ENV_SUPERVISOR_PID = "CKPT_SUPERVISOR_PID"
#: How a launch starts: ``fresh``, ``resume`` or ``branch`` (a checkpoint copied from another
#: run by ``ckpt run --from``, whose manifest's ``meta.parent`` names the source).
ENV_START = "CKPT_START"
START_FRESH = "fresh"
START_RESUME = "resume"
START_BRANCH = "branch"

#: Every variable a supervisor sets for its job (``SUPERVISOR_ENV`` of ``src/protocol.rs``): a
#: tool that starts ``ckpt run`` from inside a supervised job removes them first.
SUPERVISOR_ENV = (
    ENV_DIR,
    ENV_RESTORE,
    ENV_RESTORE_CHECK,
    ENV_RESTORE_SEQ,
    ENV_RESTORE_STEP,
    ENV_RESTART_COUNT,
    ENV_SOCKET,
    ENV_SIGNAL,
    ENV_PROTOCOL,
    ENV_SUPERVISOR_PID,
    ENV_START,
)

#: Largest datagram the supervisor reads.
MAX_MESSAGE_BYTES = 64 * 1024


def env(name: str) -> Optional[str]:
    """An environment variable of the protocol; an empty value means unset."""
    v = os.environ.get(name)
    return v if v else None


def parse_signal(s: str) -> Optional[int]:
    """A signal given as a number (``10``) or a name (``USR1``, ``SIGUSR1``, any case)."""
    s = s.strip()
    if s.isascii() and s.isdigit():
        n = int(s)
        return n if 1 <= n <= 64 else None
    up = s.upper()
    name = up[3:] if up.startswith("SIG") else up
    try:
        return int(signal.Signals["SIG" + name])
    except KeyError:
        return None


_REQUEST_OK = {
    int(getattr(signal, n))
    for n in ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGALRM", "SIGURG", "SIGWINCH", "SIGIO", "SIGPWR", "SIGVTALRM", "SIGPROF")
    if hasattr(signal, n)
}


def request_signal_problem(sig: int) -> Optional[str]:
    """Why ``sig`` cannot be a checkpoint-request signal, or None when it can (the rule of
    docs/protocol.md, the same as the supervisor's): USR1, USR2, HUP, ALRM, URG, WINCH, IO,
    PWR, VTALRM, PROF or a real-time signal (34..64)."""
    if sig in _REQUEST_OK or 34 <= sig <= 64:
        return None
    s = signal
    if sig in (s.SIGKILL, s.SIGSTOP):
        return "cannot be caught"
    if sig in (s.SIGTERM, s.SIGINT):
        return 'means "stop" to every client'
    if sig in (s.SIGCHLD, s.SIGCONT, s.SIGTSTP, s.SIGTTIN, s.SIGTTOU):
        return "is a job-control signal"
    if sig in (s.SIGSEGV, s.SIGBUS, s.SIGFPE, s.SIGILL, s.SIGTRAP, s.SIGSYS, s.SIGABRT, s.SIGQUIT, s.SIGPIPE):
        return "reports a fault or asks for a core dump"
    if sig in (32, 33):
        return "is reserved by the C library's threads"
    return "is not a signal"


class Channel:
    """Fire-and-forget datagrams to the supervisor's socket (``CKPT_SOCKET``). Never blocks
    and never raises: the supervisor re-reads the directory anyway."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._sock: Optional[socket.socket] = None
        if path:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.setblocking(False)
                self._sock = s
            except OSError:
                self._sock = None

    def send(self, msg: Dict[str, Any]) -> bool:
        """Sends one message (``{"type": ..., "v": 1, ...}``); returns whether it went out."""
        if self._sock is None or self.path is None:
            return False
        data = json.dumps(msg, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_MESSAGE_BYTES:
            return False
        try:
            self._sock.sendto(data, self.path)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
