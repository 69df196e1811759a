"""`gpuguardd`: the daemon in the foreground, as systemd runs it.

Exit status (CONTRACT.md): 0 after SIGTERM/SIGINT, 2 on a config or usage
error, 1 on any other fatal error.
"""

from __future__ import annotations

import argparse
import fcntl
import grp
import os
import signal
import sys
from pathlib import Path

import structlog

from gpuguard import __version__
from gpuguard.config import Config, ConfigError, load, unsafe_owner_or_mode, with_overrides
from gpuguard.nvml.backend import Backend, BackendUnavailable

log = structlog.get_logger("gpuguard.daemon")

SIM_KERNEL_LOG = "simulated-kmsg"  # under the state dir, written by the simulator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpuguardd",
        description="GPU health daemon and training supervisor (runs in the foreground).",
    )
    parser.add_argument("--config", type=Path, help="TOML config (default /etc/gpuguard/config.toml)")
    parser.add_argument("--simulate", type=int, metavar="N", help="N simulated GPUs instead of NVML")
    parser.add_argument("--state-dir", type=Path, help="overrides [daemon] state_dir")
    parser.add_argument("--socket", type=Path, help="overrides [daemon] socket")
    parser.add_argument("--version", action="version", version=f"gpuguardd {__version__}")
    args = parser.parse_args(argv)
    if args.simulate is not None and not 1 <= args.simulate <= 64:
        parser.error("--simulate N needs 1 <= N <= 64")
    return args


def check_state_dir(path: Path) -> None:
    """Create the state dir (0711: jobs reach their own files, list nothing);
    refuse one that others can write, sticky bit or not: the daemon creates
    files there by name, and a name someone else created first is theirs."""
    path.mkdir(parents=True, exist_ok=True, mode=0o711)
    problem = unsafe_owner_or_mode(path.stat())
    if problem:
        raise ConfigError(None, "daemon.state_dir", f"{path} is {problem}; make it 0711 or 0700, owned by this user")


def lock_state_dir(path: Path) -> int:
    """Hold an exclusive lock on the state dir for the daemon's life (the fd stays
    open): two daemons on one state dir would both restart the same jobs."""
    lock = path / "gpuguardd.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(None, "daemon.state_dir", f"{path} is in use by another gpuguardd (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def make_backend(config: Config, simulate: int | None) -> tuple[Backend, Path]:
    """The GPU backend and the kernel log the daemon should follow."""
    if simulate is not None:
        from gpuguard.sim.backend import SimulatedBackend

        kmsg = config.daemon.state_dir / SIM_KERNEL_LOG
        kmsg.touch(mode=0o600)  # followed from the start, before the first injected Xid
        return SimulatedBackend(simulate, kmsg, timeout_s=config.monitor.nvml_timeout_s), kmsg
    from gpuguard.nvml.real import NvmlBackend

    return NvmlBackend(timeout_s=config.monitor.nvml_timeout_s), config.monitor.kernel_log


def admin_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = with_overrides(load(args.config), state_dir=args.state_dir, socket=args.socket)
    except ConfigError as exc:
        print(f"gpuguardd: {exc}", file=sys.stderr)
        return 2
    from gpuguard import logs

    logs.configure(config.daemon.log_level, config.daemon.log_format)
    try:
        return run(config, args.simulate, args.config, (args.state_dir, args.socket))
    except ConfigError as exc:
        print(f"gpuguardd: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailable as exc:
        print(f"gpuguardd: {exc}; to try gpuguard without a GPU, run: gpuguardd --simulate 2", file=sys.stderr)
        return 1
    except Exception as exc:  # the one place a fatal error becomes exit 1
        log.critical("fatal", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        return 1


def run(
    config: Config, simulate: int | None, config_path: Path | None, overrides: tuple[Path | None, Path | None]
) -> int:
    from gpuguard.control.server import ControlServer, check_location
    from gpuguard.daemon.control import DaemonController
    from gpuguard.daemon.service import Daemon
    from gpuguard.store import EventStore

    check_state_dir(config.daemon.state_dir)
    lock_state_dir(config.daemon.state_dir)
    check_location(config.daemon.socket)  # before the supervisor creates the jobs' runtime dir beside it
    backend, kernel_log = make_backend(config, simulate)
    store = EventStore(config.daemon.state_dir / "gpuguard.db", records=config.daemon.state_dir / "records")
    state_dir, socket_path = overrides
    daemon = Daemon(
        config,
        backend,
        store,
        kernel_log,
        reload_config=lambda: with_overrides(load(config_path), state_dir=state_dir, socket=socket_path),
    )
    # before start-up, which may take a while: a SIGHUP's default action would end the daemon
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    daemon.start()
    gid = admin_gid(config.daemon.admin_group)
    server = ControlServer(
        config.daemon.socket, DaemonController(daemon), admin_gid=gid, mode=config.daemon.socket_mode, group_gid=gid
    )
    server.start()

    def on_stop(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    log.info(
        "ready",
        version=__version__,
        backend=backend.kind,
        gpus=len(daemon.inventory),
        socket=str(config.daemon.socket),
        state_dir=str(config.daemon.state_dir),
        kernel_log=str(kernel_log),
        pid=os.getpid(),
    )
    try:
        daemon.run()
    finally:
        server.stop()
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
