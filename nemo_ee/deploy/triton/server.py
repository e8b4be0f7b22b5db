"""Run a real ``tritonserver`` on loopback for a model repository, with what its Python stub needs.

The binary: ``--tritonserver PATH`` if given, else the one shipped in the nvidia-pytriton wheel, else a
system one (``tritonserver`` on PATH or /opt/tritonserver/bin). For the wheel's binary (Triton 2.51) we set
up, in a temporary directory we own (never in site-packages):

- a backend directory ``python/`` with the wheel's ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the Python-backend stub built for *this* Python version, passed
  as ``--backend-directory``;
- ``LD_LIBRARY_PATH``: this interpreter's libpython directory first (on pyenv builds the stub otherwise
  loads Debian's libpython 3.11.2 against pyenv's 3.11.7 stdlib and fails with
  ``'_thread.RLock' object has no attribute '_recursion_count'``), then the wheel's bundled libraries
  (the copied stub no longer finds them through its RPATH);
- ``PATH`` with this interpreter's bin directory first. The stub embeds Python, ignores PYTHONPATH and
  finds its prefix by looking up ``python3`` on PATH; with a venv's bin first it starts as that venv
  (``sys.prefix`` = the venv: its site-packages, its numpy). Without this the stub imports the base
  interpreter's numpy before model.py runs, and a numpy 2 there breaks the stub's BYTES tensors.

model.py also puts config.pbtxt's ``python_path`` entries first on sys.path (for setups without the PATH
trick). :meth:`TritonServer.start` waits for ``/v2/health/ready``; :meth:`TritonServer.stop` asks the
server to exit, then kills its process group (the stubs too) if it has not after its exit timeout.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Optional, Sequence

STUB = "triton_python_backend_stub"
_LOAD_ERROR = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.*?)(?:\\n\\nAt:|\"$)")


class ServerStartError(RuntimeError):
    """tritonserver exited or timed out before it was ready; the message says why (the model's load error)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pytriton_root() -> Optional[Path]:
    """``.../site-packages/pytriton`` of the nvidia-pytriton wheel, without importing it (None: not installed)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / "tritonserver" / "bin" / "tritonserver").is_file() else None


def find_tritonserver(explicit: Optional[str] = None) -> tuple[Path, bool]:
    """(binary, whether it is the nvidia-pytriton wheel's) or a FileNotFoundError saying what to install."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"no tritonserver binary at {path}")
        root = pytriton_root()
        return path, root is not None and path.resolve() == (root / "tritonserver" / "bin" / "tritonserver").resolve()
    root = pytriton_root()
    if root is not None:
        return root / "tritonserver" / "bin" / "tritonserver", True
    for candidate in (shutil.which("tritonserver"), "/opt/tritonserver/bin/tritonserver"):
        if candidate and Path(candidate).is_file():
            return Path(candidate), False
    raise FileNotFoundError("no tritonserver found: pip install -e '.[triton]' (nvidia-pytriton ships one), "
                            "or put a tritonserver on PATH, or pass --tritonserver PATH")


def libpython_dir() -> Optional[str]:
    """The directory of this interpreter's shared libpython (None for a static build)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    return libdir if libdir and (Path(libdir) / soname).exists() else None


def prepare_backend_dir(dest: str | Path, root: Optional[Path] = None) -> Path:
    """``dest/python`` with the wheel's Python backend and the stub for this Python; returns ``dest``."""
    root = root or pytriton_root()
    if root is None:
        raise FileNotFoundError("nvidia-pytriton is not installed (pip install -e '.[triton]')")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        have = sorted(p.name for p in (root / "tritonserver" / "python_backend_stubs").iterdir())
        raise FileNotFoundError(f"nvidia-pytriton ships no Python backend stub for Python {version} (it has {have})")
    backend = Path(dest) / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for item in (root / "tritonserver" / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, backend / item.name)
    shutil.copy2(stub, backend / STUB)
    os.chmod(backend / STUB, 0o755)
    return Path(dest)


def stub_environment(base: Optional[dict] = None, root: Optional[Path] = None) -> dict:
    """The server's environment: PATH and LD_LIBRARY_PATH as the stub needs them (see the module doc)."""
    env = dict(os.environ if base is None else base)
    root = root or pytriton_root()
    libs = [d for d in (libpython_dir(), str(root.parent / "nvidia_pytriton.libs") if root else None) if d]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir])
    env.pop("PYTHONHOME", None)
    return env


class TritonServer:
    """A tritonserver process serving ``repository`` on ``host`` (loopback by default); a context manager."""

    def __init__(self, repository: str | Path, http_port: int = 8000, grpc_port: int = 8001,
                 host: str = "127.0.0.1", tritonserver: Optional[str] = None,
                 log: Optional[str | Path] = "auto", verbose: bool = False, exit_timeout: int = 10,
                 extra_args: Sequence[str] = ()) -> None:
        """``log``: a file for the server's output; "auto": a file in the server's temp dir; None: this terminal."""
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"no model repository at {self.repository}")
        self.host, self.http_port, self.grpc_port = host, int(http_port), int(grpc_port)
        self.binary, self.from_wheel = find_tritonserver(tritonserver)
        self.log_setting, self.verbose, self.exit_timeout = log, verbose, int(exit_timeout)
        self.extra_args = list(extra_args)
        self.process: Optional[subprocess.Popen] = None
        self.workdir: Optional[Path] = None
        self.log_path: Optional[Path] = None
        self._log_file: Optional[IO] = None
        self._shm_regions: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        cmd = [str(self.binary), f"--model-repository={self.repository}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--allow-gpu-metrics=false", "--disable-auto-complete-config",
               "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout}",
               f"--log-verbose={1 if self.verbose else 0}"]
        if self.from_wheel:
            cmd.append(f"--backend-directory={self.workdir / 'backends'}")
        return cmd + self.extra_args

    def start(self, timeout: float = 600.0, cancel: Optional[threading.Event] = None) -> "TritonServer":
        """Launch and wait until ``/v2/health/ready``; on failure stop it and raise with the log's tail.

        ``cancel`` set while waiting (Ctrl-C in serve_triton.py): stop the server, raise KeyboardInterrupt.
        """
        if self.process is not None:
            raise RuntimeError("the server is already started")
        for port in (self.http_port, self.grpc_port):  # else a server already there could answer our readiness poll
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
                try:
                    probe.bind((self.host, port))
                except OSError as err:
                    raise OSError(f"port {port} on {self.host} is not free ({err.strerror}): "
                                  "pick other ports") from None
        self.workdir = Path(tempfile.mkdtemp(prefix="nemo_ee_triton_"))
        env = dict(os.environ)
        if self.from_wheel:
            root = self.binary.resolve().parents[2]
            prepare_backend_dir(self.workdir / "backends", root)
            env = stub_environment(env, root)
        if self.log_setting == "auto":
            self.log_path = self.workdir / "tritonserver.log"
        elif self.log_setting is not None:
            self.log_path = Path(self.log_setting)
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                        stdout=self._log_file, stderr=subprocess.STDOUT if self._log_file else None)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ServerStartError(f"tritonserver exited with code {code} before it was ready"
                                       + self._why())
            if self.ready():
                self._remember_stubs()
                return self
            if cancel is not None and cancel.is_set():
                self.stop()
                raise KeyboardInterrupt("cancelled while the server was starting")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"tritonserver was not ready after {timeout:.0f}s" + self._why())
            time.sleep(0.5)

    def ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200 (every model loaded)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _children(self) -> list[int]:
        """Processes in the server's process group (its Python stubs), read from /proc."""
        if self.process is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.process.pid:
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.process.pid:  # pgrp (the server leads its own session)
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
        return found

    def _remember_stubs(self) -> None:
        """Note the shared-memory regions of the stubs, to remove them if the server has to be killed."""
        for pid in self._children():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(STUB.encode()) and len(args) > 2:
                self._shm_regions.add(args[2].decode())

    def stop(self) -> None:
        """Ask the server to exit (SIGINT); past its exit timeout kill its process group; clean up."""
        process, self.process = self.process, None
        if process is not None:
            self.process = process  # for _children
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(self.exit_timeout + 20)
                except subprocess.TimeoutExpired:
                    pass
            leftovers = self._children()
            if process.poll() is None or leftovers:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
            self.process = None
        for region in self._shm_regions:
            path = Path("/dev/shm") / region
            if region.startswith("triton_python_backend_shm_region") and path.exists():
                path.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir is not None:
            if self.log_setting == "auto":
                self._saved_log = self._log_lines()  # the log file goes with the temp dir
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _why(self) -> str:
        """The models' load errors from the log, then its tail (or where the log went)."""
        lines = self._log_lines()
        errors = [f"{m.group(1)}: {m.group(2)}" for m in map(_LOAD_ERROR.search, lines) if m]
        text = "".join(f"\n  model {e}" for e in dict.fromkeys(errors))
        if lines:
            text += "\n--- last lines of the server log:\n" + self.log_tail(25)
        elif self.log_setting is None:
            text += " (its log is above)"
        return text

    def _log_lines(self) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return list(getattr(self, "_saved_log", []))
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [line for line in text if line.strip() and not line.startswith(("+", "|"))]

    def log_tail(self, lines: int = 40, width: int = 1500) -> str:
        """The last ``lines`` lines of the server's log (tables left out, each cut to ``width`` characters)."""
        kept = self._log_lines()
        if not kept:
            return "(no log: the server wrote to the terminal)" if self.log_setting is None else "(empty log)"
        return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in kept[-lines:])

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
