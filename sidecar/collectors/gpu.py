"""Per-GPU sampling through NVML (``nvidia-ml-py``, imported as ``pynvml``).

NVML is initialised once, by :meth:`GpuCollector.start`; with no driver or no GPU the collector logs "no GPU"
once, reports ``available = False`` with the reason, and every :meth:`sample` returns an empty list. Fields a
driver or board does not support are ``None``, never an error. :meth:`sample` does blocking driver calls: the
app runs it in a worker thread.

A GPU that NVML reports lost (``NVMLError_GpuIsLost``, ``NVML_ERROR_GPU_IS_LOST``: fallen off the bus, dead until
a reset) is not a GPU with unknown fields: its sample says so (``lost``, the error's text) and carries nothing
else read, and the other GPUs are read as usual. ``sidecar.gpu_faults`` turns that into the fatal-fault path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_MAX_EVENTS_PER_SAMPLE = 256


@dataclass(slots=True)
class GpuProcess:
    """GPU memory one process holds on one device."""

    pid: int
    used_bytes: int | None


@dataclass(slots=True)
class GpuSample:
    """One reading of one GPU; DCGM meanings (utilisation as 0-1, framebuffer in bytes, power in watts)."""

    index: int
    uuid: str
    name: str
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    framebuffer_used_bytes: int | None = None
    framebuffer_free_bytes: int | None = None
    framebuffer_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    sm_clock_hz: float | None = None
    memory_clock_hz: float | None = None
    xid_errors_total: int = 0
    last_xid: int | None = None
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    lost: str | None = None
    """NVML's error when it reported this GPU lost (``"NVMLError_GpuIsLost: GPU is lost"``); None otherwise."""

    @property
    def framebuffer_used_percent(self) -> float | None:
        if self.framebuffer_used_bytes is None or not self.framebuffer_total_bytes:
            return None
        return 100.0 * self.framebuffer_used_bytes / self.framebuffer_total_bytes

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "utilization_ratio": self.utilization_ratio,
            "memory_utilization_ratio": self.memory_utilization_ratio,
            "framebuffer_used_bytes": self.framebuffer_used_bytes,
            "framebuffer_free_bytes": self.framebuffer_free_bytes,
            "framebuffer_total_bytes": self.framebuffer_total_bytes,
            "framebuffer_used_percent": self.framebuffer_used_percent,
            "temperature_celsius": self.temperature_celsius,
            "power_watts": self.power_watts,
            "power_limit_watts": self.power_limit_watts,
            "sm_clock_hz": self.sm_clock_hz,
            "memory_clock_hz": self.memory_clock_hz,
            "xid_errors_total": self.xid_errors_total,
            "last_xid": self.last_xid,
            "ecc_corrected_total": self.ecc_corrected_total,
            "ecc_uncorrected_total": self.ecc_uncorrected_total,
            "processes": [{"pid": p.pid, "used_bytes": p.used_bytes} for p in self.processes],
            "lost": self.lost,
        }


def is_gpu_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is NVML saying the GPU is gone: pynvml's ``NVMLError_GpuIsLost`` (its code,
    ``NVML_ERROR_GPU_IS_LOST``, is 15), or an error that carries its name or message on (a wrapper's)."""
    if type(exc).__name__ == "NVMLError_GpuIsLost":
        return True
    if type(exc).__name__.startswith("NVMLError") and getattr(exc, "value", None) == _NVML_ERROR_GPU_IS_LOST:
        return True
    text = str(exc)
    return "GPU_IS_LOST" in text or "GPU is lost" in text


_NVML_ERROR_GPU_IS_LOST = 15


class GpuCollector:
    """Reads every GPU NVML sees. Thread-safe: samples are serialised by a lock.

    :meth:`start`, :meth:`read` (one GPU) and :meth:`close` are what an implementation over another source of
    readings replaces; :meth:`sample` (all GPUs, a lost one as a ``lost`` sample) stays.
    """

    def __init__(self, *, processes: bool = True) -> None:
        self._processes = processes
        self._nvml = None
        self._handles: list = []
        self._static: list[tuple[str, str]] = []
        self._events = None
        self._xid_counts: list[int] = []
        self._last_xid: list[int | None] = []
        self._lock = threading.Lock()
        self._started = False
        self.available = False
        self.reason: str | None = "not started"
        self.driver_version: str | None = None

    def start(self) -> bool:
        """Initialise NVML once; returns whether any GPU can be read."""
        if self._started:
            return self.available
        self._started = True
        try:
            import pynvml
        except ImportError as exc:  # nvidia-ml-py is a core dependency, but be explicit if it was removed
            return self._unavailable(f"nvidia-ml-py is not installed ({exc})")
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, or an odd OSError
            return self._unavailable(f"NVML unavailable: {exc}")
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            self.driver_version = _text(_quiet(pynvml.nvmlSystemGetDriverVersion))
            for index in range(count):
                try:
                    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                except Exception as exc:
                    if not is_gpu_lost(exc):
                        raise
                    # Listed, and read as lost: one dead GPU must not hide the others' metrics.
                    self._handles.append(exc)
                    self._static.append((f"GPU-{index}", "unknown"))
                    continue
                self._handles.append(handle)
                self._static.append(
                    (_text(_quiet(pynvml.nvmlDeviceGetUUID, handle)) or f"GPU-{index}",
                     _text(_quiet(pynvml.nvmlDeviceGetName, handle)) or "unknown")
                )
        except Exception as exc:  # noqa: BLE001
            self.close()
            return self._unavailable(f"NVML could not enumerate GPUs: {exc}")
        if not self._handles:
            self.close()
            return self._unavailable("NVML found no GPU")
        self._register_xid_events()
        self._ready(list(zip(self._handles, self._static)))
        log.info("GPU collector: %d GPU(s) via NVML, driver %s", len(self._handles), self.driver_version)
        return True

    def _ready(self, devices: list[tuple[Any, tuple[str, str]]]) -> None:
        """The GPUs to read from now on: ``(handle, (uuid, name))`` each."""
        self._handles = [handle for handle, _ in devices]
        self._static = [static for _, static in devices]
        self._xid_counts = [0] * len(devices)
        self._last_xid = [None] * len(devices)
        self._started = True
        self.available = True
        self.reason = None

    def _unavailable(self, reason: str) -> bool:
        self.available = False
        self.reason = reason
        log.warning("no GPU: %s; GPU metrics are off, everything else carries on", reason)
        return False

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError:
            self._events = None
            return
        for handle in self._handles:
            if isinstance(handle, BaseException):  # lost when the collector started
                continue
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
            except nvml.NVMLError as exc:  # not supported on every board (or in containers)
                log.debug("XID events not readable on a GPU: %s", exc)

    def _drain_xid_events(self) -> None:
        nvml = self._nvml
        if self._events is None:
            return
        uuids = {uuid: i for i, (uuid, _) in enumerate(self._static)}
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError:  # NVMLError_Timeout: nothing pending
                return
            index = None
            try:
                index = uuids.get(_text(nvml.nvmlDeviceGetUUID(event.device)))
            except nvml.NVMLError:
                pass
            if index is None:
                continue
            self._xid_counts[index] += 1
            self._last_xid[index] = int(event.eventData)

    @property
    def count(self) -> int:
        return len(self._handles)

    def sample(self) -> list[GpuSample]:
        """Read every GPU now (blocking driver calls); ``[]`` when NVML is unavailable. A GPU NVML reports lost is
        a sample with ``lost`` set (and nothing else read); any other error propagates."""
        if not self.available:
            return []
        with self._lock:
            self._drain_xid_events()
            out = []
            for index, handle in enumerate(self._handles):
                try:
                    s = self.read(index, handle)
                except Exception as exc:
                    if not is_gpu_lost(exc):
                        raise
                    uuid, name = self._static[index]
                    s = GpuSample(index=index, uuid=uuid, name=name, lost=f"{type(exc).__name__}: {exc}")
                s.xid_errors_total = self._xid_counts[index]
                s.last_xid = self._last_xid[index]
                out.append(s)
            return out

    def read(self, index: int, handle: Any) -> GpuSample:
        """One GPU's reading (fields it cannot read are None); raises NVML's error when the GPU is lost."""
        if isinstance(handle, BaseException):  # NVML's error when the collector started
            raise handle
        nvml = self._nvml
        uuid, name = self._static[index]
        s = GpuSample(index=index, uuid=uuid, name=name)
        util = _try(nvml.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            s.utilization_ratio = util.gpu / 100.0
            s.memory_utilization_ratio = util.memory / 100.0
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
        if mem is not None:
            s.framebuffer_used_bytes = int(mem.used)
            s.framebuffer_free_bytes = int(mem.free)
            s.framebuffer_total_bytes = int(mem.total)
        temp = _try(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        s.temperature_celsius = None if temp is None else float(temp)
        power = _try(nvml.nvmlDeviceGetPowerUsage, handle)
        s.power_watts = None if power is None else power / 1000.0
        limit = _try(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        s.power_limit_watts = None if limit is None else limit / 1000.0
        sm = _try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        s.sm_clock_hz = None if sm is None else sm * 1e6
        memclk = _try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM)
        s.memory_clock_hz = None if memclk is None else memclk * 1e6
        s.ecc_corrected_total = _try(
            nvml.nvmlDeviceGetTotalEccErrors, handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC
        )
        s.ecc_uncorrected_total = _try(
            nvml.nvmlDeviceGetTotalEccErrors, handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
        )
        if self._processes:
            s.processes = self._read_processes(handle)
        return s

    def _read_processes(self, handle) -> list[GpuProcess]:
        nvml = self._nvml
        procs: dict[int, GpuProcess] = {}
        for reader in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for p in _try(reader, handle) or ():
                used = getattr(p, "usedGpuMemory", None)
                # NVML reports "not available" (e.g. without privileges) as None or as a huge sentinel.
                if used is not None and used >= 2**63:
                    used = None
                procs[int(p.pid)] = GpuProcess(int(p.pid), None if used is None else int(used))
        return list(procs.values())

    def close(self) -> None:
        """Shut NVML down; the collector reports unavailable afterwards."""
        with self._lock:
            nvml, self._nvml = self._nvml, None
            if nvml is None:
                return
            if self._events is not None:
                _quiet(nvml.nvmlEventSetFree, self._events)
                self._events = None
            self._handles = []
            self.available = False
            self.reason = "closed"
            _quiet(nvml.nvmlShutdown)


def _try(fn, *args):
    """Call an NVML getter; ``None`` where the field is unsupported or unreadable. A lost GPU is not an unknown
    field: that error propagates, for :meth:`GpuCollector.sample` to report the GPU lost."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported, NoPermission...: the field is unknown
        if is_gpu_lost(exc):
            raise
        return None


def _quiet(fn, *args):
    """Call an NVML function whose failure, a lost GPU's included, only leaves a value unknown."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return None


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["GpuCollector", "GpuProcess", "GpuSample", "is_gpu_lost"]
