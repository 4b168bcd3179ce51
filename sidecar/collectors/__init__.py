"""Resource collectors: NVML per GPU, psutil for the host and the orchestrator process."""

from sidecar.collectors.gpu import GpuCollector, GpuProcess, GpuSample
from sidecar.collectors.host import HostCollector, HostSample, ProcessSample

__all__ = ["GpuCollector", "GpuProcess", "GpuSample", "HostCollector", "HostSample", "ProcessSample"]
