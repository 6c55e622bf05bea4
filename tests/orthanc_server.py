"""A real Orthanc PACS (Debian packages ``orthanc``, ``orthanc-dicomweb``, ``orthanc-gdcm``) started as a
plain process for tests and benchmarks: a JSON configuration and the storage in a temporary
folder, free loopback ports, a unique ``Name`` checked on ``/system``, stopped by its PID.

What is exposed: the HTTP server refuses remote clients (``RemoteAccessAllowed: false``); the DICOM
port of this Orthanc version listens on every interface, so every DICOM service is restricted to
the AE titles listed in ``DicomModalities`` *and* to 127.0.0.1 (``DicomCheckModalityHost``), echo
included; WebDAV, Lua and REST writes to the file system are off.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
PLUGINS = ("libOrthancDicomWeb.so", "libOrthancGdcm.so")


def find_orthanc() -> tuple[str | None, list[str], str]:
    """``(binary, plugin paths, why not)``: the binary is None when Orthanc or its DICOMweb plugin is missing."""
    binary = shutil.which("Orthanc") or next((p for p in ORTHANC_CANDIDATES if os.access(p, os.X_OK)), None)
    if binary is None:
        return None, [], "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb orthanc-gdcm)"
    plugins = []
    for name in PLUGINS:
        found = next((str(Path(d) / name) for d in PLUGIN_DIRS if (Path(d) / name).is_file()), None)
        if found is None and name == "libOrthancDicomWeb.so":
            return None, [], "the Orthanc DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
        if found:
            plugins.append(found)
    return binary, plugins, ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process; ``modalities`` maps an AE title to the loopback port of its SCP (0: none)."""

    def __init__(self, workdir: Path, modalities: dict[str, int] | None = None, users: dict[str, str] | None = None):
        self.binary, self.plugins, why = find_orthanc()
        if self.binary is None:
            raise RuntimeError(why)
        self.workdir = Path(workdir)
        self.name = f"medtransfer-test-{uuid.uuid4().hex[:12]}"
        self.aet = "ORTHANC"
        self.http_port, self.dicom_port = free_port(), free_port()
        self.modalities = modalities or {"MEDTRANSFER": 0}
        self.users = users
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict:
        storage = str(self.workdir / "storage")
        cfg = {
            "Name": self.name, "StorageDirectory": storage, "IndexDirectory": storage,
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "DicomCheckCalledAet": True, "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
            "DicomModalities": {aet.lower(): [aet, "127.0.0.1", port or 104] for aet, port in self.modalities.items()},
            "Plugins": self.plugins, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageAccessOnFind": "Always", "OverwriteInstances": True, "SaveJobs": False,
            "WebDavEnabled": False, "ExecuteLuaEnabled": False, "RestApiWriteToFileSystemEnabled": False,
            "HttpThreadsCount": 8, "DicomThreadsCount": 4, "DicomScpTimeout": 30, "StableAge": 1,
        }
        if self.users:
            cfg["RegisteredUsers"] = self.users
        return cfg

    def start(self, timeout: float = 20.0) -> OrthancServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.workdir / "orthanc.log", "wb")
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen([self.binary, str(path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   + (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:])
            try:
                if self.get("/system").get("Name") == self.name:
                    return self
            except OSError:  # not listening yet (URLError is an OSError)
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {timeout:g} s")

    def _request(self, method: str, path: str, data: bytes | None = None):
        import base64
        import urllib.request

        req = urllib.request.Request(self.http + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get(self, path: str):
        return self._request("GET", path)

    def upload(self, files) -> int:
        """POST each DICOM file to /instances; returns how many were stored."""
        n = 0
        for f in files:
            self._request("POST", "/instances", Path(f).read_bytes())
            n += 1
        return n

    def instances(self, **keys: str) -> list[dict]:
        """QIDO-RS instance search (DICOM JSON), e.g. ``instances(Modality="SR")``."""
        from urllib.parse import urlencode

        return self.get("/dicom-web/instances" + ("?" + urlencode(keys) if keys else "")) or []

    def pause(self) -> None:
        """Freeze the process (it accepts connections but answers nothing) until :meth:`resume`."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, grace: float = 0.3) -> None:
        """Stop the process by its PID (SIGTERM, SIGKILL after ``grace`` seconds: a graceful stop takes
        Orthanc about 3.5 s and its storage is removed anyway) and remove its storage."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir / "storage", ignore_errors=True)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def self_signed_pem(folder: Path) -> Path | None:
    """A certificate for 127.0.0.1 and its key in one PEM file (openssl), or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    key, cert, pem = folder / "key.pem", folder / "cert.pem", folder / "server.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    pem.write_text(cert.read_text() + key.read_text())
    return pem


class TlsProxy:
    """HTTPS on a loopback port in front of an HTTP server (Orthanc's own HTTPS server crashes on its
    first connection in Debian's 1.10.1): a real TLS handshake with ``pem``'s certificate."""

    def __init__(self, target_port: int, pem: Path):
        import http.server
        import ssl
        import threading
        import urllib.error
        import urllib.request

        class Forward(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                req = urllib.request.Request(f"http://127.0.0.1:{target_port}{self.path}", data=body,
                                             method=self.command)
                for key in ("Accept", "Content-Type", "Authorization"):
                    if self.headers.get(key):
                        req.add_header(key, self.headers[key])
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as err:
                    status, headers, data = err.code, err.headers, err.read()
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Forward)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pem))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def dcmtk_tool(name: str) -> str | None:
    """The path of a DCMTK command-line tool (``storescu``, ``dsrdump``, …), skipping same-named
    programs from other packages (pynetdicom installs a ``storescu`` too)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for d in dict.fromkeys(dirs):
        path = Path(d) / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "$dcmtk" in out.stdout + out.stderr:
            return str(path)
    return None
