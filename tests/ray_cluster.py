"""A real multi-node Ray cluster on this machine, for tests and benchmarks.

Each node is a ``ray start --block`` process in its own session with its own temp dir and ports;
it is stopped by signalling the processes of that session only: ``ray stop`` would stop every Ray
process on the machine, other people's included. Ray itself rewrites a loopback node address to
the machine's own IP (``resolve_ip_for_localhost``), so the nodes talk over that address; nothing
leaves the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# For the nodes and the drivers: fast failure detection (a killed raylet is declared dead in about
# 2 s instead of about 15 s); no usage stats; no token authentication, whatever ~/.ray/auth_token an
# earlier 'ray.init()' of this user left (Ray 2.60 writes one when it starts a local instance).
CLUSTER_ENV = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
               "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Process ids of the session ``sid`` (Linux ``/proc``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayNode:
    """One ``ray start --block`` process (its session holds every process of the node)."""

    def __init__(self, proc: subprocess.Popen, temp_dir: Path, log: Path):
        self.proc, self.temp_dir, self.log = proc, temp_dir, log

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid)

    def raylet_pid(self) -> int:
        found = [p for p in self.pids() if "raylet/raylet" in _cmdline(p)]
        if not found:
            raise RuntimeError(f"no raylet in the session of {self.proc.pid}; log: {self.log.read_text()[-2000:]}")
        return found[0]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the node's processes, then SIGKILL what is left; returns when none is left."""
        for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, timeout / 2)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while self.pids() and time.time() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class LocalRayCluster:
    """A head node and worker nodes on this machine; ``with LocalRayCluster() as c: c.add_node()``."""

    def __init__(self, object_store_mb: int = 100, env: dict[str, str] | None = None):
        self.object_store_mb = object_store_mb
        self.env = {**os.environ, **CLUSTER_ENV, **(env or {})}
        self.nodes: list[RayNode] = []
        self.address = ""

    def add_node(self, num_cpus: int = 1, timeout: float = 90.0) -> RayNode:
        """Start a node (the first one is the head) and return once it has joined."""
        temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Unix socket paths are limited
        args = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory",
                str(self.object_store_mb * 1024 ** 2), "--temp-dir", str(temp_dir), "--disable-usage-stats",
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0",  # 0: the OS picks free worker ports
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
        if not self.nodes:
            port = free_port()
            args += ["--head", "--port", str(port), "--include-dashboard", "false",
                     "--dashboard-port", str(free_port())]
        else:
            args += ["--address", self.address]
        log = temp_dir / "start.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = RayNode(proc, temp_dir, log)
        self.nodes.append(node)
        self._wait_started(node, timeout)
        if len(self.nodes) == 1:
            self.address = f"{_node_ip(log)}:{port}"
        return node

    @staticmethod
    def _wait_started(node: RayNode, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in node.log.read_text():
                return
            if node.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"ray start did not come up: {node.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head (GCS) last
            node.stop()
        self.nodes.clear()

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _node_ip(log: Path) -> str:
    for line in log.read_text().splitlines():
        if "Local node IP:" in line:
            return line.rsplit(":", 1)[1].strip()
    return "127.0.0.1"
