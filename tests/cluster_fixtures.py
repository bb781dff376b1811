"""Fixtures for cluster tests: a fresh PostgreSQL database per test and a real two-node Ray cluster.

Import the fixtures into a test module (`from cluster_fixtures import postgres_uri, two_node_cluster`; pytest puts tests/ on sys.path).
The cluster is started with the real `ray start` CLI, each node with its own --temp-dir, and stopped by the pids of
the two `ray start --block` processes and their process groups, never by the `ray` CLI's stop command (that would stop every Ray on
the machine).
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
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_database(uri: str, name: str) -> str:
    return urlunsplit(urlsplit(uri)._replace(path=f"/{name}"))


@pytest.fixture
def postgres_uri() -> str:
    """URI of a fresh, empty database on ECGSEARCH_POSTGRES_URI's server, dropped after the test.

    Skips when no PostgreSQL answers, unless ECGSEARCH_REQUIRE_POSTGRES=1 (CI), where it fails.
    """
    import psycopg

    admin = os.environ.get("ECGSEARCH_POSTGRES_URI", DEFAULT_POSTGRES)
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL at {urlsplit(admin).hostname}:{urlsplit(admin).port} does not answer ({e})"
        if os.environ.get("ECGSEARCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + "; ECGSEARCH_REQUIRE_POSTGRES=1 forbids skipping")
        pytest.skip(reason + "; set ECGSEARCH_POSTGRES_URI")
    name = f"ecgsearch_test_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(admin, name)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class TwoNodeCluster:
    address: str                    # GCS address to pass to ray.init / run_search
    node_ips: dict[str, str]        # node IP (what Tune reports as `node_ip`) -> node id
    worker: subprocess.Popen        # the worker node's `ray start --block`, its own process group (fault tests)


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group. Token auth off: in Ray 2.60 a head turns it on by itself when
    ~/.ray/auth_token exists, but a joining node and ray.init(address=HOST:PORT) do not, so they could not connect."""
    ray = Path(sys.executable).with_name("ray")
    with open(log, "wb") as out:
        return subprocess.Popen([str(ray), "start", "--block", "--disable-usage-stats", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled"))


def _stop_node(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops its node in ~2 s (SIGTERM to the whole group takes ~30 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(ready, nodes: list[subprocess.Popen], timeout: float, what: str, logs: Path) -> None:
    """Poll `ready()` until true; fail at once if a `ray start` exited (ray.init would retry for minutes)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if any(p.poll() is not None for p in nodes):
            raise RuntimeError(f"ray start exited before {what} was up; see {logs}/head.log and worker.log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up within {timeout:.0f} s; see {logs}")
        time.sleep(0.3)


def _node_args(temp_dir: str, ip: str) -> list[str]:
    return ["--num-cpus", "1", "--num-gpus", "0", "--temp-dir", temp_dir, "--node-ip-address", ip,
            "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> TwoNodeCluster:
    """A head and a worker node on this machine, 1 CPU each, the worker on 127.0.0.2 so trials tell them apart.

    Temp dirs are short paths under /tmp (Ray's sockets must fit the 107-byte Unix socket limit); node logs go to
    tmp_path/head.log and tmp_path/worker.log.
    """
    import ray

    port = free_port()
    address = f"127.0.0.1:{port}"
    dirs = [tempfile.mkdtemp(prefix="rayh", dir="/tmp"), tempfile.mkdtemp(prefix="rayw", dir="/tmp")]
    nodes = [_start_node(["--head", "--port", str(port), "--include-dashboard", "false",
                          *_node_args(dirs[0], "127.0.0.1")], tmp_path / "head.log")]
    try:
        _wait(lambda: _answers(port), nodes, 60, f"the head's GCS port {port}", tmp_path)
        nodes.append(_start_node(["--address", address, *_node_args(dirs[1], "127.0.0.2")], tmp_path / "worker.log"))
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        _wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, nodes, 60, "the worker node", tmp_path)
        alive = [n for n in ray.nodes() if n["Alive"]]
        ray.shutdown()
        node_ips = {n["NodeManagerAddress"]: n["NodeID"] for n in alive}
        assert len(node_ips) == 2, f"both nodes report one IP {node_ips}: trials could not be told apart"
        yield TwoNodeCluster(address, node_ips, nodes[1])
    finally:
        ray.shutdown()
        for p in reversed(nodes):
            _stop_node(p)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
