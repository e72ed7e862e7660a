"""A real Orthanc and a real ``lungsam node`` on free loopback ports, for tests and the measurement script
(scripts/pacs_latency.py). Nothing is mocked: Orthanc 1.10 with its DICOMweb plugin, dcmtk's storescu, the node as
a subprocess of the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")

#: Orthanc routes new chest radiographs (DX for presentation / processing, CR) to the node, nothing else.
ROUTE_LUA = """
local chest = {
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- DX, for presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- DX, for processing
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- CR
}
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] ~= 'Lua' and chest[tags['SOPClassUID']] then
    SendToModality(instanceId, 'lungsam')
  end
end
"""


def missing_tools() -> str | None:
    """Why the PACS tests cannot run here, or ``None``."""
    for what, ok in (("Orthanc (/usr/sbin/Orthanc, Debian package orthanc)", ORTHANC.exists()),
                     ("the Orthanc DICOMweb plugin (Debian package orthanc-dicomweb)", DICOMWEB_PLUGIN.exists()),
                     ("dcmtk's storescu (Debian package dcmtk)", STORESCU is not None)):
        if not ok:
            return f"{what} is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, step_s: float = 0.2):
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


class Orthanc:
    """Orthanc on free loopback ports with its own storage; routes chest radiographs to the node by Lua."""

    def __init__(self, root: Path, node_port: int, node_ae: str = "LUNGSAM", aet: str = "ORTHANC"):
        self.root = root
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "route.lua").write_text(ROUTE_LUA)
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "lungsam-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomModalities": {"lungsam": {"AET": node_ae, "Host": "127.0.0.1", "Port": node_port}},
            "DicomScuTimeout": 20, "LuaScripts": [str(root / "route.lua")], "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StorageCompression": False,
            "ConcurrentJobs": 1, "HttpThreadsCount": 4, "StableAge": 1}, indent=1))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen([str(ORTHANC), str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.get("/system", quiet=True) is not None or self._dead(), 30, "Orthanc to start")
        if self._dead():
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def get(self, path: str, quiet: bool = False):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                body = r.read()
                return json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if quiet:
                return None
            raise

    def post(self, path: str, data: bytes | str):
        req = urllib.request.Request(self.url + path, data=data.encode() if isinstance(data, str) else data,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def lookup(self, sop_instance_uid: str) -> str | None:
        """Orthanc's instance id of a SOP Instance UID, or ``None``."""
        hits = [h for h in self.post("/tools/lookup", sop_instance_uid) if h.get("Type") == "Instance"]
        return hits[0]["ID"] if hits else None

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def instances_of_modality(self, modality: str) -> list[str]:
        """SOP Instance UIDs of every instance in series of ``modality``."""
        out = []
        for s in self.post("/tools/find", json.dumps({"Level": "Series", "Query": {"Modality": modality},
                                                       "Expand": True})):
            for i in s["Instances"]:
                out.append(self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"])
        return out

    def statistics(self) -> dict:
        return self.get("/statistics")


def storescu(files: list[Path], port: int, called: str, calling: str = "MODALITY", timeout_s: float = 120
             ) -> subprocess.CompletedProcess:
    """dcmtk's storescu: all ``files`` in one association to 127.0.0.1:``port``."""
    return subprocess.run([STORESCU, "-aet", calling, "-aec", called, "-to", "20", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=timeout_s, check=False)


def node_toml(path: Path, *, work_dir: Path, port: int, bundle: Path, destinations: list[dict],
              allowed: list[str] | None = None, sr: bool = True, retry_initial_s: float = 0.3,
              retry_max_s: float = 2.0, threads: int = 1, max_object_mb: float | None = None) -> Path:
    """Write a node.toml (the format of docs/pacs.md)."""
    lines = [f'work_dir = "{work_dir}"', "", "[listen]", 'ae_title = "LUNGSAM"', 'host = "127.0.0.1"',
             f"port = {port}"]
    if allowed is not None:
        lines.append("allowed_calling_ae_titles = [" + ", ".join(f'"{a}"' for a in allowed) + "]")
    if max_object_mb is not None:
        lines.append(f"max_object_mb = {max_object_mb}")
    lines += ["allowed_addresses = [\"127.0.0.1\"]", "", "[model]", f'bundle = "{bundle}"', f"threads = {threads}",
              f"sr = {'true' if sr else 'false'}", "", "[retry]", f"initial_s = {retry_initial_s}",
              f"max_s = {retry_max_s}"]
    for d in destinations:
        lines += ["", "[[destinations]]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in d.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class NodeProcess:
    """``lungsam node --config node.toml`` as a subprocess of the real CLI (so SIGKILL is a real kill -9)."""

    def __init__(self, config: Path, port: int, log: Path):
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90, ready=None) -> NodeProcess:
        """Start and wait until ``ready()`` (default: a plain C-ECHO from ORTHANC) succeeds."""
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(self.log, "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen([sys.executable, "-c", "from lungsam.cli import main; main()", "node",
                                      "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO)
        ready = ready or self.echo
        try:
            wait_until(lambda: ready() or self.proc.poll() is not None, timeout_s, "the node to answer C-ECHO", 0.3)
        except TimeoutError:
            self.kill()  # never leave a node behind
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"lungsam node exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return self

    def echo(self, calling: str = "ORTHANC") -> bool:
        if ECHOSCU is None:
            raise RuntimeError("echoscu (dcmtk) is not installed")
        r = subprocess.run([ECHOSCU, "-aet", calling, "-aec", "LUNGSAM", "-to", "5", "127.0.0.1", str(self.port)],
                           capture_output=True, text=True, timeout=30, check=False)
        return r.returncode == 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
