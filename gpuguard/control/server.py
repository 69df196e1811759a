"""The control socket: a Unix stream socket served on background threads.

The accept thread (`door.Door`) admits connections by the peer's uid from
SO_PEERCRED (`limits`: per uid, with slots kept for root and for
`check`/`status`; beyond them a "busy" reply and close) and waits for their
first request line; then each connection gets its own thread, so one slow or
stalled client never blocks the others. Each request line must arrive within
`request_timeout_s`, so an idle connection frees its slot. The uid/gid and
groups also decide whether the peer may run changing commands.

The socket is created safely: the directory must not be a symlink nor
world-writable without the sticky bit; a live socket at the path (another
daemon answers) refuses the start, a stale one is replaced, anything else at
the path is left alone and refuses the start. It is bound under a temporary
name, given its mode and group, and only then renamed into place.
"""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import stat
import threading
import time
from pathlib import Path

import structlog

from gpuguard.control.commands import COMMANDS, CommandError, Controller, PeerCred, dispatch
from gpuguard.control.door import BUSY, Door, Ids, refuse_busy
from gpuguard.control.limits import QUICK_COMMANDS, Admission, Lane, Limits
from gpuguard.control.protocol import MAX_REQUEST_BYTES, ProtocolError, decode_request, encode_error, encode_result

log = structlog.get_logger("gpuguard.control")

BACKLOG = 1024  # room for a burst of connects while the accept thread catches up
MAX_PATH_BYTES = 107  # sun_path holds 108 bytes with the terminating NUL
SEND_TIMEOUT_S = 30.0  # a client that does not read its reply this long is dropped


class ControlServerError(RuntimeError):
    """The control socket cannot be set up; the message says why and where."""


class _TooLarge(Exception):
    pass


class ControlServer:
    def __init__(
        self,
        path: Path,
        controller: Controller,
        *,
        admin_gid: int | None,
        mode: int = 0o660,
        group_gid: int | None = None,
        limits: Limits = Limits(),
        request_timeout_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.controller = controller
        self.admin_gid = admin_gid
        self.mode = mode
        self.group_gid = group_gid
        self.request_timeout_s = request_timeout_s
        self.limits = limits
        self._admission = Admission(limits)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    # --- life cycle ----------------------------------------------------
    def start(self) -> None:
        """Create the socket and serve it on background threads."""
        self._listener = self._bind()
        self._listener.setblocking(False)
        door = Door(
            self._listener,
            self._wake_r,
            self._admission,
            {Lane.FULL: self.request_timeout_s, Lane.QUICK: self.limits.quick_timeout_s},
            self._hand_off,
        )
        self._accept_thread = threading.Thread(target=door.run, name="control-accept", daemon=True)
        self._accept_thread.start()
        log.info("control socket ready", socket=str(self.path), mode=oct(self.mode), admin_gid=self.admin_gid)

    def stop(self) -> None:
        """Stop accepting, drop open connections, remove the socket if it is still ours."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._wake_r.close()
        self._wake_w.close()

    # --- socket creation -----------------------------------------------
    def _bind(self) -> socket.socket:
        check_location(self.path)
        _clear_stale(self.path)
        tmp = self.path.parent / f".{secrets.token_hex(4)}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            try:
                # not listening yet: a connect to the temporary name is refused
                os.chmod(tmp, self.mode)
                if self.group_gid is not None:
                    os.chown(tmp, -1, self.group_gid)
                sock.listen(BACKLOG)
                os.rename(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            sock.close()
            raise ControlServerError(f"{self.path}: cannot create the control socket: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        return sock

    # --- serving ---------------------------------------------------------
    def _hand_off(self, conn: socket.socket, ids: Ids, lane: Lane, buf: bytearray) -> None:
        """A connection with its first request line in `buf` gets its own thread."""
        conn.setblocking(True)
        with self._lock:
            self._conns.add(conn)
        try:
            threading.Thread(target=self._serve, args=(conn, ids, lane, buf), name="control-conn", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: answer busy rather than leak the slot
            log.warning("control connection thread failed to start", error=str(exc))
            with self._lock:
                self._conns.discard(conn)
            self._admission.release(ids[1], lane)
            refuse_busy(conn)

    def _serve(self, conn: socket.socket, ids: Ids, lane: Lane, buf: bytearray) -> None:
        """Answer request lines until the client closes or stalls; the quick lane answers one."""
        quick = lane is Lane.QUICK
        try:
            with conn:
                peer = PeerCred(*ids, groups=_groups(*ids))
                while not self._stopping.is_set():
                    try:
                        line = _read_line(conn, buf, self.request_timeout_s)
                    except _TooLarge:
                        conn.settimeout(SEND_TIMEOUT_S)
                        conn.sendall(encode_error(f"request too large (limit {MAX_REQUEST_BYTES} bytes)", "bad_request"))
                        return
                    except TimeoutError:
                        log.debug("control client too slow, dropped", pid=peer.pid, uid=peer.uid)
                        return
                    if line is None:
                        return
                    reply = self._handle(line, peer, quick)
                    conn.settimeout(SEND_TIMEOUT_S)
                    conn.sendall(reply)
                    if quick:
                        return
        except OSError as exc:  # the client went away mid-reply
            log.debug("control connection dropped", error=str(exc))
        finally:
            with self._lock:
                self._conns.discard(conn)
            self._admission.release(ids[1], lane)

    def _handle(self, line: bytes, peer: PeerCred, quick: bool) -> bytes:
        cmd = "?"
        try:
            request = decode_request(line)
            cmd = request.cmd
            if quick and cmd not in QUICK_COMMANDS:
                return encode_error(BUSY + f"; only {' and '.join(sorted(QUICK_COMMANDS))} are answered now", "busy")
            command = COMMANDS.get(cmd)
            if command is not None and command.mutating:
                shown = {k: v for k, v in request.args.items() if k != "env"}  # env may hold secrets
                log.info("control command", cmd=cmd, uid=peer.uid, pid=peer.pid, args=shown)
            return encode_result(dispatch(self.controller, request, peer, self.admin_gid))
        except ProtocolError as exc:
            return encode_error(str(exc), "bad_request")
        except CommandError as exc:
            return encode_error(exc.message, exc.code)
        except Exception as exc:
            log.exception("control command failed", cmd=cmd, uid=peer.uid, pid=peer.pid)
            return encode_error(f"internal error in {cmd}: {type(exc).__name__} (see the daemon's log)", "internal")


def _read_line(conn: socket.socket, buf: bytearray, timeout_s: float) -> bytes | None:
    """The next request line (without its newline) from `conn`, buffering in `buf`.

    None at end of input (a partial line then is a half-closed client, dropped
    quietly); TimeoutError when the line does not arrive within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        end = buf.find(b"\n")
        if end >= 0:
            if end + 1 > MAX_REQUEST_BYTES:
                raise _TooLarge
            line = bytes(buf[:end])
            del buf[: end + 1]
            return line
        if len(buf) >= MAX_REQUEST_BYTES:
            raise _TooLarge
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        conn.settimeout(remaining)
        chunk = conn.recv(MAX_REQUEST_BYTES)
        if not chunk:
            return None
        buf += chunk


def _groups(pid: int, uid: int, gid: int) -> tuple[int, ...]:
    """Supplementary groups from the user database, else from /proc."""
    try:
        return tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        pass
    try:  # a uid with no passwd entry (containers): the process's own groups
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for row in f:
                if row.startswith("Groups:"):
                    return tuple(int(g) for g in row.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def check_location(path: Path) -> None:
    """Refuse a socket path that is too long or whose directory is unsafe.

    The daemon calls this before it creates anything beside the socket (the
    jobs' runtime files), so a symlinked directory is refused before use."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ControlServerError(f"{path}: too long for a Unix socket path (at most {MAX_PATH_BYTES} bytes)")
    _check_directory(path.parent)


def _check_directory(parent: Path) -> None:
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        raise ControlServerError(f"{parent}: the socket's directory does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise ControlServerError(f"{parent}: the socket's directory is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise ControlServerError(f"{parent}: not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ControlServerError(f"{parent}: the socket's directory is world-writable without the sticky bit")


def _clear_stale(path: Path) -> None:
    """Unlink a stale socket at `path`; refuse a live one or anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise ControlServerError(f"{path} exists and is {kind}; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("removed stale control socket", socket=str(path))
        return
    except TimeoutError:
        pass  # a full backlog: someone is listening
    except OSError as exc:
        raise ControlServerError(f"{path}: cannot tell whether another daemon uses this socket: {exc}") from None
    finally:
        probe.close()
    raise ControlServerError(f"{path}: another daemon is already answering on this socket")
