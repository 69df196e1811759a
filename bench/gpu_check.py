"""One prepared run that checks gpuguard on a real GPU machine (or, with
--simulate N, on simulated GPUs so the script cannot rot).

1. the real NVML backend: every snapshot field of every GPU and whether the
   driver supports it; one poll per GPU timed (median of 100);
2. NVML event registration: what the driver accepted;
3. gpuguardd on that backend, with the reset command in DRY-RUN (it never
   resets the GPU or changes its settings): status, check, events;
4. a real tiny YOLO training as a gpuguard job on the GPU; its trainer is
   SIGSTOPped so the GPU goes idle: gpuguard must see the hang, restart the
   job, and the run must resume and complete;
5. a short table last. Logs go under $OUT when it is set.

Usage: bench/gpu_check.sh [--simulate N] [--polls 100]   (installs this tree first; see there)
       python bench/gpu_check.py [--simulate N] [--polls 100]   (the gpuguard installed beside python)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpuguard.nvml.backend import Backend  # noqa: E402
from gpuguard.nvml.types import GpuSnapshot  # noqa: E402

SKIP_FIELDS = {"index", "uuid", "timestamp", "findings", "processes"}


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_backend(simulate: int | None, tmp: Path) -> Backend:
    if simulate:
        from gpuguard.sim.backend import SimulatedBackend

        return SimulatedBackend(simulate, tmp / "sim-kmsg")
    from gpuguard.nvml.real import NvmlBackend

    return NvmlBackend(timeout_s=5.0)


def field_table(snap: GpuSnapshot) -> list[tuple[str, Any]]:
    return [
        (f.name, getattr(snap, f.name)) for f in dataclasses.fields(snap) if f.name not in SKIP_FIELDS
    ]


def probe(backend: Backend, polls: int, report: dict[str, Any]) -> None:
    t = time.perf_counter()
    backend.open()
    report["open_s"] = round(time.perf_counter() - t, 3)
    driver = backend.driver_info()
    inventory = backend.inventory()
    report["driver"] = dataclasses.asdict(driver)
    report["gpus"] = [dataclasses.asdict(g) for g in inventory]
    print(f"driver {driver.driver_version}, CUDA {driver.cuda_driver_version}, NVML {driver.nvml_version}")
    for g in inventory:
        print(f"GPU {g.index}: {g.name} {g.uuid} PCI {g.pci_bus_id} serial {g.serial} mem {g.memory_total_bytes}")
    first = backend.poll()
    report["fields"] = {}
    for snap in first:
        print(f"\n-- GPU {snap.index} snapshot fields (None = not supported / not available)")
        rows = field_table(snap)
        for name, value in rows:
            print(f"   {name:28s} {value!r}")
        print(f"   {'processes':28s} {[dataclasses.asdict(p) for p in snap.processes]}")
        print(f"   {'findings':28s} {[dataclasses.asdict(f) for f in snap.findings]}")
        report["fields"][snap.uuid] = {name: value for name, value in rows}
        report.setdefault("findings", {})[snap.uuid] = [dataclasses.asdict(f) for f in snap.findings]
    times = []
    for _ in range(polls):
        t = time.perf_counter()
        backend.poll()
        times.append(time.perf_counter() - t)
    per_gpu_ms = 1000 * statistics.median(times) / max(1, len(inventory))
    report["poll_median_ms_per_gpu"] = round(per_gpu_ms, 3)
    report["poll_p90_ms_all"] = round(1000 * sorted(times)[int(0.9 * (len(times) - 1))], 3)
    print(f"\none poll: median {per_gpu_ms:.2f} ms per GPU over {polls} polls")
    t = time.perf_counter()
    events = backend.wait_events(1.0)
    registered = getattr(backend, "registered_events", lambda: {})()
    report["events_registered"] = registered
    report["events_wait_s"] = round(time.perf_counter() - t, 3)
    print(f"NVML events registered: {registered}; waited {report['events_wait_s']} s, got {len(events)}")
    backend.close()


def daemon_check(simulate: int | None, tmp: Path, out: Path, report: dict[str, Any]) -> None:
    """gpuguardd on this backend with the reset command in dry-run."""
    bindir = Path(os.environ.get("GPUGUARD_BIN") or Path(sys.executable).parent)  # gpu_check.sh's install
    report["bin"] = str(bindir)
    config = tmp / "config.toml"
    config.write_text(
        "[monitor]\npoll_interval_s = 1.0\nhang_timeout_s = 5.0\n"
        "[jobs]\ncheckpoint_grace_s = 5.0\nstop_timeout_s = 3.0\n"
        "[reset]\n"
        'command = ["echo", "DRY-RUN: would reset", "{uuid}"]\n'
    )
    sock = tmp / "gpuguard.sock"
    argv = [str(bindir / "gpuguardd"), "--config", str(config), "--state-dir", str(tmp / "state"), "--socket", str(sock)]
    if simulate:
        argv += ["--simulate", str(simulate)]
    log = (out / "gpuguardd.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bindir / "gpuguardctl"), "--socket", str(sock), *args], capture_output=True, text=True, timeout=30)

    try:
        status: dict[str, Any] = {}
        while time.monotonic() - t0 < 60:
            if proc.poll() is not None:
                break
            result = ctl("status", "--json")
            if result.returncode == 0:
                status = json.loads(result.stdout)
                if status["daemon"]["last_poll_at"]:
                    break
            time.sleep(0.1)
        report["daemon_ready_s"] = round(time.monotonic() - t0, 2)
        report["daemon_status"] = status
        print(f"\ngpuguardd ready in {report['daemon_ready_s']} s")
        print(ctl("status").stdout)
        check = ctl("check")
        report["check"] = {"exit": check.returncode, "line": check.stdout.strip()}
        print(f"check: exit {check.returncode}: {check.stdout.strip()}")
        t = time.monotonic()
        reset = ctl("reset", "0")  # the dry-run command: NVML closed, echo run, NVML reopened
        report["reset_dry_run"] = {
            "exit": reset.returncode,
            "s": round(time.monotonic() - t, 3),
            "out": (reset.stdout + reset.stderr).strip(),
        }
        print(f"reset 0 (dry run): exit {reset.returncode} in {report['reset_dry_run']['s']} s: {report['reset_dry_run']['out']}")
        time.sleep(2.5)  # a few polls after NVML was reopened
        after = json.loads(ctl("status", "--json").stdout)
        report["after_reset_states"] = [g["state"] for g in after["gpus"]]
        print(f"states after the dry-run reset: {report['after_reset_states']}")
        job_check(ctl, bindir, tmp, report)
        print(ctl("events", "--limit", "40").stdout)
    finally:
        proc.terminate()
        try:
            report["daemon_exit"] = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            report["daemon_exit"] = "killed"
        log.close()


def job_check(ctl: Any, bindir: Path, tmp: Path, report: dict[str, Any]) -> None:
    """A real YOLO job; its trainer SIGSTOPped; gpuguard must restart it and the run complete."""
    import psutil

    data = tmp / "data"
    subprocess.run([str(bindir / "gpuguard-yolo"), "make-dataset", str(data), "--train", "96"], check=True, capture_output=True)
    project = tmp / "runs"
    t0 = time.monotonic()
    run = ctl(
        "run", "--name", "yolo", "--workdir", str(tmp), "--",
        str(bindir / "gpuguard-yolo"), "train", "model=yolov8n.yaml", f"data={data / 'data.yaml'}", "epochs=3",
        "imgsz=64", "batch=8", "workers=0", f"project={project}", "name=check", "plots=False",
    )  # fmt: skip
    print(run.stdout + run.stderr)
    job_report: dict[str, Any] = {}
    report["job"] = job_report

    def events() -> list[dict[str, Any]]:
        return json.loads(ctl("events", "--json", "--job", "yolo", "--limit", "300").stdout or "[]")

    def job() -> dict[str, Any]:
        return next(j for j in json.loads(ctl("status", "--json").stdout)["jobs"] if j["name"] == "yolo")

    def wait(pred: Any, what: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            time.sleep(0.1)
        job_report["timed_out"] = what
        raise TimeoutError(what)

    try:
        wait(lambda: any(e["kind"] == "snapshot_saved" for e in events()), "the first checkpoint", 300)
        job_report["first_checkpoint_s"] = round(time.monotonic() - t0, 1)
        status = json.loads(ctl("status", "--json").stdout)
        job_report["gpu_util_while_training"] = [g.get("gpu_util_pct") for g in status["gpus"]]
        wrapper = psutil.Process(job()["pid"])
        trainer = next(p for p in wrapper.children(recursive=True) if "gpuguard-yolo" in " ".join(p.cmdline()))
        trainer.send_signal(signal.SIGSTOP)
        t_stop = time.time()
        hang = wait(lambda: next((e for e in events() if e["kind"] == "hang"), None), "the hang", 120)
        restarted = wait(lambda: next((e for e in events() if e["kind"] == "job_restarted"), None), "the restart", 120)
        final = wait(lambda: (j := job())["state"] in ("succeeded", "failed") and j, "the end of training", 600)
        rows = (project / "check" / "results.csv").read_text().splitlines()[1:]
        job_report |= {
            "stop_to_hang_s": round(_ts(hang["ts"]) - t_stop, 2),
            "stop_to_restart_s": round(_ts(restarted["ts"]) - t_stop, 2),
            "final_state": final["state"],
            "attempts": final["attempt"],
            "epochs_in_results": len(rows),
        }
    except TimeoutError as exc:
        print(f"job check: timed out waiting for {exc}")
    print(f"job check: {job_report}")
    log = tmp / "state" / "jobs" / "yolo" / "output.log"
    if log.exists() and os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "yolo-output.log").write_bytes(log.read_bytes()[-200_000:])


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", type=int, default=None)
    parser.add_argument("--polls", type=int, default=100)
    args = parser.parse_args()
    out = out_dir()
    report: dict[str, Any] = {"simulate": args.simulate}
    try:
        report["proc_devices_nvidia"] = [
            line.strip() for line in Path("/proc/devices").read_text().splitlines() if "nvidia" in line
        ]
    except OSError:
        report["proc_devices_nvidia"] = None
    report["kmsg_readable"] = os.access("/dev/kmsg", os.R_OK)
    with tempfile.TemporaryDirectory(prefix="gpuguard-check-") as tmp_name:
        tmp = Path(tmp_name)
        probe(make_backend(args.simulate, tmp), args.polls, report)
        daemon_check(args.simulate, tmp, out, report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    gpus = report["gpus"]
    supported = {u: sum(v is not None for v in f.values()) for u, f in report["fields"].items()}
    total = len(next(iter(report["fields"].values()))) if report["fields"] else 0
    print("\n== gpu_check summary")
    print(f"   backend            {'simulated' if args.simulate else 'nvml'}")
    print(f"   GPUs               {len(gpus)}: {', '.join(g['name'] for g in gpus)}")
    print(f"   driver / CUDA      {report['driver']['driver_version']} / {report['driver']['cuda_driver_version']}")
    for uuid, n in supported.items():
        print(f"   fields supported   {n}/{total} on {uuid}")
    print(f"   poll per GPU       {report['poll_median_ms_per_gpu']} ms (median of {args.polls})")
    print(f"   NVML events        {report['events_registered'] or 'none registered'}")
    print(f"   /dev/kmsg readable {report['kmsg_readable']}; /proc/devices: {report['proc_devices_nvidia']}")
    print(f"   reset (dry run)    exit {report['reset_dry_run']['exit']} in {report['reset_dry_run']['s']} s; states after: {report['after_reset_states']}")
    print(f"   daemon             ready in {report['daemon_ready_s']} s, check exit {report['check']['exit']}, stop exit {report['daemon_exit']}")
    j = report.get("job", {})
    print(f"   YOLO job           {j.get('final_state', 'not finished')} after {j.get('attempts')} attempts, "
          f"{j.get('epochs_in_results')} epochs in results.csv; SIGSTOP -> hang seen {j.get('stop_to_hang_s')} s, "
          f"-> restarted {j.get('stop_to_restart_s')} s")
    ok = (
        report["daemon_exit"] == 0
        and report["check"]["exit"] in (0, 1)
        and j.get("final_state") == "succeeded"
        and j.get("epochs_in_results") == 3
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
