"""Simulated GPUs behind the same `Backend` protocol as NVML (`gpuguardd --simulate N`).

They model hardware, not a driver session: faults injected through
`gpuguardctl inject` stay until a reset (or `clear`), Xids reach the daemon
through a simulated kernel log in raw /dev/kmsg format, and utilisation follows
the CPU use of the processes attached to a GPU.
"""

from gpuguard.sim.backend import SimulatedBackend

__all__ = ["SimulatedBackend"]
