"""GPU faults that end a device's useful life until it is reset, seen in the NVML samples, alerted on, and acted on:
the sidecar asks its orchestrator to cordon the GPU (``POST /admin/devices/cuda:N/cordon``), so no new model is
placed there while an operator looks.

What counts (NVIDIA's XID catalogue): a new XID among :data:`FATAL_XIDS` (lost or reset GPU, uncontained or
double-bit ECC, fallen off the bus, ...), a rise of the uncorrectable (volatile) ECC count, or NVML reporting the
GPU lost (``NVMLError_GpuIsLost``: the collector's sample has ``lost`` set). Other XIDs (an application's own
illegal access, 13 or 31) are the application's fault and only counted (``muai_gpu_xid_errors``).

:class:`GpuFaultWatch` is the pure core (samples in, new faults out; the first sample of a GPU is its baseline for
XID and ECC counts, so a restart does not cordon again for an old fault). A lost GPU is a present state, not
history: it is a fault from the first sample that shows it, once per loss (a GPU read again and then lost again
is a new loss). The alert, ``GpuFatalFault`` (critical, labels ``gpu`` and
``uuid``), fires once per GPU and stays firing: the fault lasts until the GPU is reset, and a restarted sidecar
learns the new baseline. :func:`cordon` is the shell's call to the orchestrator, with the stack's admin token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("muai.sidecar.gpu_faults")

ALERT_GPU_FAULT = "GpuFatalFault"
FATAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
}


@dataclass(frozen=True, slots=True)
class GpuFault:
    index: int
    uuid: str
    reason: str

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


class GpuFaultWatch:
    """Per GPU (by UUID), the XID and uncorrectable-ECC counts last seen; :meth:`update` says what is new."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int | None]] = {}
        self._faulted: set[str] = set()
        self._lost: set[str] = set()

    def update(self, samples: Iterable[Any]) -> list[GpuFault]:
        """New fatal faults in ``samples`` (objects with ``index``, ``uuid``, ``xid_errors_total``, ``last_xid``,
        ``ecc_uncorrected_total``, ``lost``): an XID or ECC fault at most once per GPU while this watch lives, a
        loss once per loss."""
        out = []
        for g in samples:
            lost = getattr(g, "lost", None)
            if lost:
                if g.uuid not in self._lost:
                    self._lost.add(g.uuid)
                    out.append(GpuFault(g.index, g.uuid, f"GPU is lost ({lost})"))
                continue  # nothing else was read: the XID and ECC baselines stay as they were
            self._lost.discard(g.uuid)
            previous = self._seen.get(g.uuid)
            self._seen[g.uuid] = (g.xid_errors_total, g.ecc_uncorrected_total)
            if previous is None or g.uuid in self._faulted:
                continue
            xids, ecc = previous
            reason = None
            if g.xid_errors_total > xids and g.last_xid in FATAL_XIDS:
                reason = f"XID {g.last_xid} ({FATAL_XIDS[g.last_xid]})"
            elif g.ecc_uncorrected_total is not None and ecc is not None and g.ecc_uncorrected_total > ecc:
                reason = f"{g.ecc_uncorrected_total - ecc} uncorrectable ECC error(s)"
            if reason is not None:
                self._faulted.add(g.uuid)
                out.append(GpuFault(g.index, g.uuid, reason))
        return out


def alert_of(fault: GpuFault, severity: str = "critical") -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations of the ``GpuFatalFault`` alert for ``fault``."""
    labels = {"alertname": ALERT_GPU_FAULT, "severity": severity, "gpu": str(fault.index), "uuid": fault.uuid}
    annotations = {
        "summary": f"GPU {fault.index} faulted: {fault.reason}",
        "description": f"NVML reported {fault.reason} on GPU {fault.index} ({fault.uuid}); the sidecar asked the "
                       f"orchestrator to cordon {fault.device}. Reset the GPU (or replace it), then uncordon it.",
    }
    return labels, annotations


async def cordon(session: Any, orchestrator_url: str, token: str | None, fault: GpuFault) -> str:
    """Ask the orchestrator to cordon the faulted GPU; what happened, for the log (never raises: the alert has
    gone out whatever the orchestrator says)."""
    if not token:
        return "not cordoned: no admin token (sidecar.tuner.admin_token)"
    url = f"{orchestrator_url.rstrip('/')}/admin/devices/{fault.device}/cordon"
    try:
        async with session.post(url, json={"reason": f"sidecar: {fault.reason}"},
                                headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.text()
            if resp.status == 200:
                return f"cordoned {fault.device}"
            return f"cordon of {fault.device} refused: {resp.status} {body[:200]}"
    except Exception as exc:  # an orchestrator that is down or unreachable: logged, never fatal
        return f"cordon of {fault.device} failed: {type(exc).__name__}: {exc}"


__all__ = ["ALERT_GPU_FAULT", "FATAL_XIDS", "GpuFault", "GpuFaultWatch", "alert_of", "cordon"]
