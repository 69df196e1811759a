"""Why a GPU is not healthy, in sentences for an operator.

The daemon's reasons and findings are written for the record (they name
NVML calls and internal states; `status --json` keeps them whole). Here each
known message becomes a short phrase, the phrases of a GPU's findings are
joined, and the one thing to do comes last, from the GPU's `action`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gpuguard.ctl.tables import plural

_Phrase = Callable[[re.Match[str]], str]

# the daemon's messages (gpuguard/health/checks, gpuguard/daemon/gpus.py), most specific first
_PHRASES: tuple[tuple[re.Pattern[str], _Phrase], ...] = tuple(
    (re.compile(pattern), phrase)
    for pattern, phrase in (
        (r"GPU is lost\b", lambda m: "the GPU is lost (the driver can no longer reach it)"),
        (r"GPU requires a reset\b", lambda m: "the driver says the GPU needs a reset"),
        (r"NVML wedged: no answer within the deadline for (\d+)s",
         lambda m: f"the driver has not answered for {plural(int(m[1]), 'second')}"),  # fmt: skip
        (r"NVML did not answer in time", lambda m: "the driver did not answer in time"),
        (r"NVML returned an unexpected error", lambda m: "the driver returned an unexpected error"),
        (r"no data from NVML", lambda m: "no reading from the driver yet"),
        (r"no sample yet", lambda m: "no reading yet"),
        (r"reset in progress", lambda m: "a reset is in progress"),
        (r"excluded by operator$", lambda m: "excluded by an operator"),
        (r"Xid (\d+) \((.*?)\):.*?(?: \(seen (\d+) times\))?$",
         lambda m: f"Xid {m[1]} ({m[2]})" + (f", seen {m[3]} times" if m[3] else "")),  # fmt: skip
        (r"(\d+) uncorrected ECC errors? since the last reset",
         lambda m: f"{plural(int(m[1]), 'uncorrected ECC error')} since the last reset"),  # fmt: skip
        (r"corrected ECC errors at (\d+)/h \(over ([\d.]+)/h\)",
         lambda m: f"{m[1]} corrected ECC errors an hour (more than {m[2]}): the memory is wearing"),  # fmt: skip
        (r"(\d+) retired memory pages? \(limit (\d+)\)",
         lambda m: f"{plural(int(m[1]), 'retired memory page')} (limit {m[2]})"),  # fmt: skip
        (r"memory page retirement pending", lambda m: "a memory page retirement is pending"),
        (r"row remapping pending", lambda m: "a row remap is pending"),
        (r"row remapping failed", lambda m: "a row remap failed"),
        (r"temperature (\d+) C \(limit (\d+) C\)", lambda m: f"temperature {m[1]} C, at or over the {m[2]} C limit"),
        (r"temperature (\d+) C \(over (\d+) C\)", lambda m: f"temperature {m[1]} C, over {m[2]} C"),
        (r"hardware slowdown or power brake held for (\d+) s",
         lambda m: f"clocks throttled (hardware slowdown or power brake) for {plural(int(m[1]), 'second')}"),  # fmt: skip
        (r"driver asks for recovery action (\d+): (.*)", lambda m: f"the driver asks for recovery action {m[1]} ({m[2]})"),
    )
)
_ADVICE = {
    "restart_app": "Restart the application.",
    "reset_gpu": "Reset the GPU.",
    "reboot_node": "Reboot the node.",
    "hardware_inspection": "Have the hardware inspected.",
    "unknown": "No known remedy: look the Xid up in NVIDIA's catalog.",
}
_SEEN_IN = re.compile(r" \(seen in [^)]*\)")
_SEVERITY = {"critical": 0, "error": 1, "warning": 2}
MAX_PHRASES = 3


def phrase(message: str) -> str:
    """One daemon message as an operator's phrase (lower case, no full stop);
    an unknown one (an operator's own reason) as it was, less internals."""
    for pattern, make in _PHRASES:
        if m := pattern.match(message):
            return make(m)
    return _SEEN_IN.sub("", message).strip().rstrip(".")


def explain(gpu: dict[str, Any]) -> str | None:
    """Why the GPU is in its state, in sentences; None for a healthy GPU."""
    state = gpu.get("state")
    if state == "healthy":
        return None
    phrases: list[str] = []
    if state == "excluded" and gpu.get("reason"):
        why = phrase(str(gpu["reason"]))
        phrases.append(why if why.startswith("excluded") else f"excluded: {why}")
    elif gpu.get("reason") and not _findings(gpu):
        phrases.append(phrase(str(gpu["reason"])))
    for said in map(phrase, _findings(gpu)):
        if said not in phrases and f"excluded: {said}" not in phrases:
            phrases.append(said)
    if not phrases:
        phrases.append(f"{state}, no reason given")
    text = "; ".join(phrases[:MAX_PHRASES])
    sentence = text[0].upper() + text[1:] + "."
    advice = _ADVICE.get(str(gpu.get("action"))) if state != "resetting" else None
    return f"{sentence} {advice}" if advice else sentence


def _findings(gpu: dict[str, Any]) -> list[str]:
    """The messages of the GPU's warnings and worse, the worst first."""
    found = [f for f in gpu.get("findings") or [] if f.get("severity") in _SEVERITY and f.get("message")]
    return [str(f["message"]) for f in sorted(found, key=lambda f: _SEVERITY[f["severity"]])]
