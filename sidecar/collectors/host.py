"""Host sampling with psutil: CPU, memory, and the orchestrator process (found by PID file or by listen port).

:meth:`HostCollector.sample` makes blocking system calls (and, when looking the process up by port, walks the
connection table): the app runs it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

log = logging.getLogger(__name__)

_PORT_LOOKUP_EVERY_S = 30.0


@dataclass(slots=True)
class ProcessSample:
    """The orchestrator process: CPU as a percent of one core (may exceed 100), RSS in bytes."""

    pid: int
    found_by: str
    cpu_percent: float
    rss_bytes: int
    num_threads: int

    def as_dict(self) -> dict:
        return {
            "pid": self.pid,
            "found_by": self.found_by,
            "cpu_percent": self.cpu_percent,
            "rss_bytes": self.rss_bytes,
            "num_threads": self.num_threads,
        }


@dataclass(slots=True)
class HostSample:
    """One reading of the host; CPU percent over all cores (0-100) since the previous sample."""

    cpu_percent: float
    cpu_count: int
    load_1m: float | None
    memory_total_bytes: int
    memory_used_bytes: int
    memory_available_bytes: int
    memory_percent: float
    swap_used_bytes: int
    orchestrator: ProcessSample | None

    def as_dict(self) -> dict:
        return {
            "cpu_percent": self.cpu_percent,
            "cpu_count": self.cpu_count,
            "load_1m": self.load_1m,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_available_bytes": self.memory_available_bytes,
            "memory_percent": self.memory_percent,
            "swap_used_bytes": self.swap_used_bytes,
            "orchestrator": None if self.orchestrator is None else self.orchestrator.as_dict(),
        }


class HostCollector:
    """Samples the host and the orchestrator process; keeps the process handle between samples."""

    def __init__(self, *, pid_file: str | None = None, port: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._pid_file = pid_file
        self._port = port
        self._clock = clock
        self._process: psutil.Process | None = None
        self._found_by = ""
        self._next_port_lookup = 0.0
        self._lock = threading.Lock()
        self._cpu_count = psutil.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point

    def sample(self) -> HostSample:
        with self._lock:
            mem = psutil.virtual_memory()
            try:
                load = os.getloadavg()[0]
            except (AttributeError, OSError):
                load = None
            return HostSample(
                cpu_percent=psutil.cpu_percent(interval=None),
                cpu_count=self._cpu_count,
                load_1m=load,
                memory_total_bytes=int(mem.total),
                memory_used_bytes=int(mem.total - mem.available),
                memory_available_bytes=int(mem.available),
                memory_percent=float(mem.percent),
                swap_used_bytes=int(psutil.swap_memory().used),
                orchestrator=self._sample_process(),
            )

    def _sample_process(self) -> ProcessSample | None:
        proc = self._find_process()
        if proc is None:
            return None
        try:
            with proc.oneshot():
                return ProcessSample(
                    pid=proc.pid,
                    found_by=self._found_by,
                    cpu_percent=proc.cpu_percent(interval=None),
                    rss_bytes=int(proc.memory_info().rss),
                    num_threads=proc.num_threads(),
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._process = None
            return None

    def _find_process(self) -> psutil.Process | None:
        if self._process is not None:
            if self._process.is_running() and self._pid_file_agrees():
                return self._process
            log.info("orchestrator process %d is gone; looking for it again", self._process.pid)
            self._process = None
        pid, how = self._pid_from_file(), "pid_file"
        if pid is None and self._port is not None and self._clock() >= self._next_port_lookup:
            self._next_port_lookup = self._clock() + _PORT_LOOKUP_EVERY_S
            pid, how = self._pid_from_port(self._port), "port"
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            proc.cpu_percent(interval=None)  # reference point for the next sample
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        self._process, self._found_by = proc, how
        log.info("watching orchestrator process %d (found by %s)", pid, how.replace("_", " "))
        return proc

    def _pid_file_agrees(self) -> bool:
        if self._found_by != "pid_file":
            return True
        return self._pid_from_file() == self._process.pid

    def _pid_from_file(self) -> int | None:
        if not self._pid_file:
            return None
        try:
            with open(self._pid_file, encoding="ascii") as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _pid_from_port(port: int) -> int | None:
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.AccessDenied, OSError):
            return None
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
        return None


__all__ = ["HostCollector", "HostSample", "ProcessSample"]
