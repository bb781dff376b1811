"""The MLflow tracking server a cluster logs to: one backend database, artifact uploads proxied through the server.

Workers on other nodes then need no shared disk for artifacts: they upload to `mlflow-artifacts:/` over HTTP and the
server writes under `--artifacts-destination`. Small-memory settings (ENVIRONMENT.md): one worker process and no job
execution, 2 processes and about 0.4 GiB instead of 15 and 2.3 GiB.
"""
from __future__ import annotations

import base64
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from data_prep.errors import InputError


_SECRET_PARAMETER = re.compile(r"(?i)([?&;](?:password|passwd|pwd|secret|token|api_?key|access_?key|secret_?key)=)"
                               r"[^&;#]*")


def _password_span(uri: str) -> tuple[int, int] | None:
    """Where the password of `scheme://user:password@host...` lies in `uri` (any scheme, even a malformed URI, so a
    password holding '@' or '/' is still all masked); None without one."""
    start = uri.find("//")
    if start < 0:
        return None
    end = min([i for i in (uri.find("?", start), uri.find("#", start)) if i >= 0] or [len(uri)])
    at, colon = uri.rfind("@", start, end), uri.find(":", start + 2)
    if not start + 2 <= colon < at or any(c in uri[start + 2:colon] for c in "/@"):
        return None
    return colon + 1, at


def mask_uri(uri: str) -> str:
    """`uri` with any password (of the user part, in every scheme, or a password= style parameter) replaced by ***,
    safe to print or log."""
    uri, span = str(uri), _password_span(str(uri))
    if span:
        uri = uri[:span[0]] + "***" + uri[span[1]:]
    return _SECRET_PARAMETER.sub(r"\1***", uri)


def mask_text(text: str, uri: str) -> str:
    """`text` (an error message) with `uri` masked and its password, as given or URL-decoded, replaced by ***."""
    text, span = str(text).replace(uri, mask_uri(uri)), _password_span(uri)
    secrets = {uri[span[0]:span[1]], unquote(uri[span[0]:span[1]])} if span else set()
    secrets |= {m.group(0).split("=", 1)[1] for m in _SECRET_PARAMETER.finditer(uri)}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def check_http(uri: str, setting: str) -> None:
    """InputError with the real cause unless the MLflow server at `uri` answers /health; a user and password in
    the URI go as HTTP basic auth, as MLflow's client sends them (urllib would take them for the host)."""
    try:
        parts = urlsplit(uri)
        request = urllib.request.Request(urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
                                         .rstrip("/") + "/health")
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
        return
    except urllib.error.HTTPError as e:
        cause = f"HTTP {e.code} {e.reason}" + ("; check the user and password" if e.code in (401, 403) else "")
    except urllib.error.URLError as e:
        cause = str(e.reason)
    except (OSError, ValueError, http.client.HTTPException) as e:  # a malformed URI or port, a reset connection
        cause = f"{type(e).__name__}: {e}"
    raise InputError(f"{setting} {mask_uri(uri)} does not answer ({mask_text(cause, uri)}); start the server or fix "
                     "the URI")


def check_port(host: str, port: int) -> None:
    """InputError unless `host:port` is free (else a new server would fail to bind while another one answers)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OverflowError:
            raise InputError(f"--port {port}: a port is 1-65535") from None
        except OSError as e:
            raise InputError(f"--port {port}: {host}:{port} is in use or unavailable ({e.strerror}); another server "
                             "answers there: choose another --port") from None


@dataclass
class ServerHandle:
    """A running `mlflow server`; `stop()` ends its whole process group."""
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)  # gunicorn/uvicorn children left behind, if any
        self.process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start_server(backend_store_uri: str, artifacts_destination: str | Path, host: str = "127.0.0.1",
                 port: int = 5000, workers: int = 1, timeout: float = 90.0,
                 log_path: str | Path | None = None) -> ServerHandle:
    """Start `mlflow server` in its own process group and return once its /health endpoint answers.

    `backend_store_uri` names the runs database (postgresql://user[:password]@host:port/db for a cluster);
    `artifacts_destination` is where proxied artifact uploads land (a directory or an object-store URI).
    The server's output goes to `log_path` (default: mlflow-server.log beside a local artifacts
    destination, else in the current directory).
    """
    if is_postgres(backend_store_uri):
        connect_postgres(backend_store_uri, "--backend-store-uri").close()
    check_port(host, port)
    destination = str(artifacts_destination)
    is_local = "://" not in destination
    if is_local:
        Path(destination).mkdir(parents=True, exist_ok=True)
        destination = str(Path(destination).resolve())
    if log_path is None:
        log_path = (Path(destination).parent if is_local else Path.cwd()) / "mlflow-server.log"
    log_path = Path(log_path)
    cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", destination, "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", str(workers)]
    # The backend URI travels in the environment, so a password in it never shows in `ps`.
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=backend_store_uri, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    handle = ServerHandle(url, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.stop()
            raise InputError(f"mlflow server for backend store {mask_uri(backend_store_uri)} exited "
                             f"(code {process.returncode}); its log {log_path} ends with:\n"
                             + _tail(log_path, backend_store_uri))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return handle
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    handle.stop()
    raise InputError(f"mlflow server on {url} did not answer /health within {timeout:.0f} s; see {log_path}")


def is_postgres(uri: str) -> bool:
    return urlsplit(uri).scheme.split("+")[0] == "postgresql"


def connect_postgres(uri: str, setting: str):
    """An autocommit psycopg connection to `uri` (a `+driver` suffix dropped). Fails in seconds, naming `setting`
    and the database, where mlflow would retry silently for minutes."""
    import psycopg

    parts = urlsplit(uri)
    try:
        return psycopg.connect(urlunsplit(parts._replace(scheme="postgresql")), autocommit=True, connect_timeout=5)
    except psycopg.Error as e:  # cannot connect, or a malformed connection string
        raise InputError(f"{setting} {mask_uri(uri)}: cannot connect ({mask_text(' '.join(str(e).split()), uri)}); "
                         f"create the database first, e.g. createdb -h {parts.hostname} -U {parts.username} "
                         f"{parts.path.lstrip('/')}") from None


def _tail(log_path: Path, secret_uri: str, lines: int = 15) -> str:
    text = mask_text(log_path.read_text(errors="replace"), secret_uri)
    return "\n".join(text.splitlines()[-lines:])
