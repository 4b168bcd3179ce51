"""The devices the orchestrator serves on, and which of them may take work: a pure book that takes ``now``, and
the inventory read at start-up (NVML where there are GPUs, the CPU otherwise).

A device is **cordoned** by an operator (``POST /admin/devices/{id}/cordon``), by the sidecar's XID/ECC alerts
through the same route, or by a fault an engine met on it (``adapters.base.DeviceFaultError``: an illegal memory
access, an uncorrectable ECC error, a device-side assert, a lost GPU). The engine that met a fault has already
failed over (its fallback chain moved the model to the next engine and retried the request); the book keeps the
device out of new placements, readiness reports it as degraded with the cause, and after ``reprobe_after_s`` a
fault cordon lifts by itself so that the chain's own re-probe can try the device again (a fault that comes back
cordons it again, with the back-off doubled). An operator's cordon stays until an operator lifts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from orchestrator.placement import Device

log = logging.getLogger("orchestrator.devices")

CordonSource = Literal["operator", "fault"]
MAX_BACKOFF_FACTOR = 16


@dataclass(frozen=True, slots=True)
class DeviceState:
    id: str
    kind: Literal["cpu", "cuda"]
    total_bytes: int = 0
    free_bytes: int = 0
    name: str = ""
    cordoned: CordonSource | None = None
    reason: str = ""
    since: float | None = None
    reprobe_at: float | None = None
    """When a fault cordon lifts by itself (None for an operator's)."""
    faults: int = 0

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "name": self.name, "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes, "schedulable": self.cordoned is None, "cordoned_by": self.cordoned,
            "reason": self.reason or None, "cordoned_for_s": None if self.since is None else round(now - self.since, 3),
            "reprobe_in_s": None if self.reprobe_at is None else round(max(0.0, self.reprobe_at - now), 3),
            "faults": self.faults,
        }


class UnknownDeviceError(KeyError):
    def __init__(self, device: str, known: Iterable[str]) -> None:
        super().__init__(device)
        self.device = device
        self.known = sorted(known)

    def __str__(self) -> str:
        return f"device {self.device!r} does not exist; devices: {', '.join(self.known) or 'none'}"


class DeviceBook:
    """Which devices may take new work, and why not. Thread safe: faults arrive from the fallback chains' switch
    threads, cordons from the admin API on the event loop (one lock, held for a few assignments)."""

    def __init__(self, devices: Iterable[DeviceState], *, reprobe_after_s: float) -> None:
        self._devices = {d.id: d for d in devices}
        self.reprobe_after_s = reprobe_after_s
        self._lock = threading.RLock()

    def __contains__(self, device: str) -> bool:
        return device in self._devices

    def get(self, device: str) -> DeviceState:
        try:
            return self._devices[device]
        except KeyError:
            raise UnknownDeviceError(device, self._devices) from None

    def devices(self, now: float) -> list[DeviceState]:
        with self._lock:
            self.expire(now)
            return list(self._devices.values())

    def cordon(self, device: str, reason: str, now: float) -> DeviceState:
        """An operator's cordon (also the sidecar's): stays until :meth:`uncordon`."""
        with self._lock:
            state = self.get(device)
            new = replace(state, cordoned="operator", reason=reason or "cordoned by an operator",
                          since=state.since if state.cordoned else now, reprobe_at=None)
            self._devices[device] = new
            log.warning("device %s cordoned: %s", device, new.reason)
            return new

    def uncordon(self, device: str, now: float) -> DeviceState:
        with self._lock:
            state = self.get(device)
            new = replace(state, cordoned=None, reason="", since=None, reprobe_at=None)
            self._devices[device] = new
            if state.cordoned:
                log.info("device %s uncordoned after %.1f s", device, now - (state.since or now))
            return new

    def fault(self, device: str, reason: str, now: float) -> DeviceState | None:
        """An engine met a device-poisoning error on ``device``; None for a device not in the book (an engine on a
        device the inventory did not list). An operator's cordon is kept as it is, the fault counted."""
        device = "cuda:0" if device == "cuda" else device  # torch names the current GPU without its index
        with self._lock:
            state = self._devices.get(device)
            if state is None:
                log.warning("a device fault on %s, which is not in the inventory: %s", device, reason)
                return None
            faults = state.faults + 1
            if state.cordoned == "operator":
                new = replace(state, faults=faults)
            else:
                backoff = self.reprobe_after_s * min(MAX_BACKOFF_FACTOR, 2 ** (faults - 1))
                new = replace(state, cordoned="fault", reason=reason, since=state.since if state.cordoned else now,
                              reprobe_at=now + backoff, faults=faults)
                log.error("device %s cordoned after a fault (%d so far; re-probed in %.0f s): %s", device, faults,
                          backoff, reason)
            self._devices[device] = new
            return new

    def expire(self, now: float) -> list[str]:
        """Lift the fault cordons whose re-probe time has come; their ids."""
        with self._lock:
            lifted = [d.id for d in self._devices.values()
                      if d.cordoned == "fault" and d.reprobe_at is not None and now >= d.reprobe_at]
            for device in lifted:
                state = self._devices[device]
                self._devices[device] = replace(state, cordoned=None, reason="", since=None, reprobe_at=None)
                log.info("device %s: fault cordon lifted for a re-probe", device)
            return lifted

    def problems(self, now: float) -> list[str]:
        """Readiness' degraded reasons: one per cordoned device, with its cause."""
        return [f"device {d.id} cordoned ({'fault' if d.cordoned == 'fault' else 'operator'}): {d.reason}"
                for d in self.devices(now) if d.cordoned]

    def for_placement(self, now: float) -> list[Device]:
        """The book as the placement planner's devices (a cordoned device takes no new replica)."""
        return [Device(d.id, total_bytes=d.total_bytes, free_bytes=d.free_bytes, cordoned=d.cordoned is not None)
                for d in self.devices(now)]


def discover() -> list[DeviceState]:
    """The devices of this machine: one per GPU NVML sees (memory from NVML), else the CPU (memory from psutil).
    A failing NVML is no GPU, said in the log."""
    gpus: list[DeviceState] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                gpus.append(DeviceState(f"cuda:{i}", "cuda", int(memory.total), int(memory.free),
                                        name.decode() if isinstance(name, bytes) else str(name)))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no driver, no library, no GPU: the CPU serves
        log.debug("no GPU inventory from NVML: %r", exc)
    if gpus:
        return gpus
    import psutil

    memory = psutil.virtual_memory()
    return [DeviceState("cpu", "cpu", int(memory.total), int(memory.available), "host CPU")]


__all__ = ["DeviceBook", "DeviceState", "UnknownDeviceError", "discover"]
