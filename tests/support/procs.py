"""Real servers the tests run as child processes (Prometheus, Alertmanager, our own CLI), stopped by PID.

Nothing here stands in for a program: :class:`Process` starts the real binary on 127.0.0.1, keeps its output in
a log file for failure messages, and ends it by PID (terminate, wait, kill) however the test ends.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from support.ports import free_port
from support.waiting import apoll, poll

ROOT = Path(__file__).resolve().parents[2]

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
NO_PROMETHEUS = "prometheus is not installed (Debian package prometheus, installed by scripts/bootstrap.sh)"
NO_ALERTMANAGER = "prometheus-alertmanager is not installed (Debian package prometheus-alertmanager)"

# Loaded here, in the parent: the child between fork and exec should not have to load a library.
try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
except OSError:
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies without its teardown."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(eq=False)
class Process:
    """One child process, its output in a log file; :meth:`stop` ends it by PID (terminate, wait, kill).

    ``with process:`` starts it and stops it again. ``url`` is where it serves HTTP, when it does.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    url: str | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> Process:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if _LIBC is not None else None,
            )
        finally:
            log.close()  # the child holds its own descriptor
        return self

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Fail, with the end of its log, if the process has exited."""
        if not self.alive():
            raise AssertionError(f"{self.name} is not running:\n{self.describe()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with {self.proc.returncode if self.proc else 'never started'}"
        return f"--- {self.name} (pid {self.pid}, {state}), end of {self.log_path}:\n{self.log_tail()}"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def answers(self, path: str = "/-/ready") -> bool:
        """Whether ``GET url+path`` answers 200 now; fails if the process has exited."""
        self.check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, path: str = "/-/ready", *, timeout: float, interval: float = 0.05) -> None:
        """Poll :meth:`answers` until it holds; fail early if the process exits, with its log either way."""
        poll(lambda: self.answers(path), timeout=timeout, interval=interval,
             what=f"{self.name} {path} to answer 200", diagnose=self.describe)

    async def await_ready(self, path: str = "/-/ready", *, timeout: float, interval: float = 0.05) -> None:
        """:meth:`wait_ready` for coroutines (the probe runs in a thread, so the loop keeps serving)."""
        await apoll(lambda: asyncio.to_thread(self.answers, path), timeout=timeout, interval=interval,
                    what=f"{self.name} {path} to answer 200", diagnose=self.describe)


def alertmanager_config(
    webhook_url: str,
    *,
    receiver: str = "hook",
    group_by: Sequence[str] = ("alertname",),
    group_wait: str = "0s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
) -> dict:
    """An Alertmanager configuration with one webhook receiver that is also told of resolutions."""
    return {
        "route": {
            "receiver": receiver,
            "group_by": list(group_by),
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        "receivers": [{"name": receiver, "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }


def alertmanager_process(config: Path, workdir: Path, *, port: int | None = None, log_level: str | None = None) -> Process:
    """The real Alertmanager on 127.0.0.1 (a free port unless given) with ``config``, its data and log in
    ``workdir``, clustering off (no gossip port to collide on). Not started yet."""
    return _server("alertmanager", ALERTMANAGER, NO_ALERTMANAGER, workdir, port, log_level, [
        f"--config.file={config}", f"--storage.path={workdir / 'alertmanager-data'}", "--cluster.listen-address=",
    ])


def prometheus_process(config: Path, workdir: Path, *, port: int | None = None, log_level: str | None = None) -> Process:
    """The real Prometheus on 127.0.0.1 (a free port unless given) with ``config``, its TSDB and log in
    ``workdir``. Not started yet."""
    return _server("prometheus", PROMETHEUS, NO_PROMETHEUS, workdir, port, log_level, [
        f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
    ])


def _server(
    name: str, binary: str | None, missing: str, workdir: Path, port: int | None, log_level: str | None, flags: list[str]
) -> Process:
    if binary is None:
        raise FileNotFoundError(missing)
    port = port or free_port()
    argv = [binary, *flags, f"--web.listen-address=127.0.0.1:{port}"]
    if log_level is not None:
        argv.append(f"--log.level={log_level}")
    return Process(name, argv, workdir / f"{name}.log", url=f"http://127.0.0.1:{port}")
