"""A real headless ComfyUI server for end-to-end tests and the demo.

    with ComfyServer(checkpoints=("sd15",)) as server:          # provisioned ComfyUI + this pack, --cpu, loopback
        result = server.run(api_graph)                           # POST /prompt, follow the websocket, read /history
        print(result.images)                                     # paths of the saved images

The server runs `main.py --cpu` of the provisioned ComfyUI (or $COMFYUI_PATH) with the interpreter running this code
(the venv), on 127.0.0.1 and a free port, with input/output/temp/user folders, the database and an
`extra_model_paths.yaml` (checkpoints, loras, embeddings, diffusers, controlnet, vae) all inside one work folder;
cached random checkpoints are symlinked into its checkpoints folder. Its stdout/stderr go to `<workdir>/server.log`.
It is always stopped by its own PID (SIGTERM, then SIGKILL after a timeout): on `stop()`, on leaving the `with`
block, at interpreter exit, and (Linux) when the process that started it dies.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "comfyui-photoswap"  # the name provisioning links this checkout under in custom_nodes/
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "diffusers", "controlnet", "vae", "upscale_models",
                 "diffusion_models", "text_encoders", "style_models", "clip_vision")


class ComfyServerError(RuntimeError):
    """The server failed to start, died, or did not answer; the message ends with the tail of its log."""


class PromptRejected(ComfyServerError):
    """POST /prompt refused the graph (validation); `.error` and `.node_errors` hold the server's answer."""

    def __init__(self, message, error=None, node_errors=None):
        super().__init__(message)
        self.error = error or {}
        self.node_errors = node_errors or {}


class ExecutionFailed(ComfyServerError):
    """A node raised while the prompt ran; carries the server's execution_error message."""

    def __init__(self, data: dict):
        self.data = data
        self.node_id = data.get("node_id")
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type")
        self.exception_message = data.get("exception_message", "")
        self.traceback = "".join(data.get("traceback") or [])
        super().__init__(f"node {self.node_id} ({self.node_type}) failed: {self.exception_type}: "
                         f"{self.exception_message}\n{self.traceback}".rstrip())


class ExecutionInterrupted(ComfyServerError):
    """The prompt was interrupted (POST /interrupt)."""


@dataclass
class RunResult:
    prompt_id: str
    history: dict  # the /history/{prompt_id} entry (prompt, outputs, status, meta)
    images: list = field(default_factory=list)  # Paths of images saved/previewed by the graph, in output order
    messages: list = field(default_factory=list)  # websocket messages seen for this prompt (type, data)
    seconds: float = 0.0

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent():  # runs in the child between fork and exec (Linux only)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 — best effort; stop()/atexit still apply
        pass


_LIVE: set = set()


@atexit.register
def _stop_all():
    for server in list(_LIVE):
        server.stop()


class ComfyServer:
    def __init__(self, workdir: str | os.PathLike | None = None, checkpoints=("sd15",), comfyui_path=None,
                 port: int | None = None, output_dir=None, extra_args=(), startup_timeout: float = 300.0,
                 disable_api_nodes: bool = True, env: dict | None = None, log=None, custom_nodes=()):
        """`checkpoints`: cached random checkpoint families to create if needed and link in ("sd15", "sd21-v",
        "sdxl"). `workdir`: kept if given, else a temp folder removed on stop(). `output_dir`: defaults to
        <workdir>/output. `extra_args`: more main.py flags. `custom_nodes`: more custom-node folders for this
        server only (test stand-ins such as devtools/test_nodes/*), linked into <workdir>/custom_nodes."""
        self.custom_nodes = tuple(Path(p).absolute() for p in custom_nodes)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="photoswap-comfy-")).absolute()
        self.checkpoints = tuple(checkpoints or ())
        self._comfyui_path = Path(comfyui_path) if comfyui_path else None
        self.port = port
        self.output_dir = Path(output_dir).absolute() if output_dir else self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.temp_dir = self.workdir / "temp"  # ComfyUI appends "temp" to --temp-directory
        self.user_dir = self.workdir / "user"
        self.models_dir = self.workdir / "models"
        self.log_path = self.workdir / "server.log"
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.disable_api_nodes = disable_api_nodes
        self.env = env
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = None
        self._log_fh = None
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def comfyui_path(self) -> Path:
        if self._comfyui_path is None:
            from .comfy_env import comfyui_path

            self._comfyui_path = comfyui_path()
        return self._comfyui_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _prepare(self):
        for folder in (self.output_dir, self.input_dir, self.temp_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
        if self.checkpoints:
            from .checkpoints import ensure_checkpoint

            for name in self.checkpoints:
                self.add_model("checkpoints", ensure_checkpoint(name, log=self._log))
        lines = ["photoswap_test:", f"  base_path: {json.dumps(str(self.models_dir))}", "  is_default: true"]
        lines += [f"  {name}: {name}" for name in MODEL_FOLDERS]
        if self.custom_nodes:
            folder = self.workdir / "custom_nodes"
            folder.mkdir(exist_ok=True)
            for source in self.custom_nodes:
                target = folder / source.name
                if not target.is_symlink():
                    target.symlink_to(source, target_is_directory=True)
            lines.append(f"  custom_nodes: {json.dumps(str(folder))}")
        self.extra_model_paths = self.workdir / "extra_model_paths.yaml"
        self.extra_model_paths.write_text("\n".join(lines) + "\n")

    def add_model(self, folder: str, source, name: str | None = None) -> Path:
        """Symlink a model file/folder into one of the server's model folders (ComfyUI rescans on the next use)."""
        source = Path(source).absolute()
        target = self.models_dir / folder / (name or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            if target.is_symlink() and target.resolve() == source.resolve():
                return target
            target.unlink()
        target.symlink_to(source, target_is_directory=source.is_dir())
        return target

    def command(self) -> list:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(self.extra_model_paths),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.workdir), "--user-directory", str(self.user_dir),
               "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}", "--disable-auto-launch"]
        if self.disable_api_nodes:
            cmd.append("--disable-api-nodes")
        return cmd + self.extra_args

    def start(self):
        if self.alive():
            return self
        self._prepare()
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if attempts > 1:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except ComfyServerError as exc:
                self.stop(remove_workdir=False)
                retry = attempt + 1 < attempts and "address already in use" in str(exc).lower()
                if not retry:
                    raise
        return self

    def _spawn_and_wait(self):
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n===== {' '.join(self.command())}\n".encode())
        self._log_fh.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_path), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        _LIVE.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} while starting"
                                       f"{self._log_tail()}")
            try:
                self._request("GET", "/system_stats", timeout=5)
                self.startup_seconds = time.perf_counter() - t0
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                time.sleep(0.25)
        raise ComfyServerError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f} s"
                               f"{self._log_tail()}")

    def stop(self, timeout: float = 20.0, remove_workdir: bool | None = None) -> int | None:
        """Stop the server by its PID (SIGTERM, SIGKILL after `timeout`), and any processes it started. Idempotent.
        Returns the exit code (None if it was never started)."""
        _LIVE.discard(self)
        code = None
        if self.proc is not None:
            children = self._descendants()
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            code = self.proc.returncode
            for child in children:
                try:
                    child.kill()
                except Exception:  # noqa: BLE001 — already gone
                    pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if remove_workdir is None:
            remove_workdir = self._own_workdir
        if remove_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _descendants(self) -> list:
        try:
            import psutil

            return psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:  # noqa: BLE001 — psutil missing or process gone
            return []

    # ------------------------------------------------------------------------------------------------ the log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"\n--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail) if tail else ""

    def custom_node_import_lines(self) -> list:
        """The 'Import times for custom nodes:' lines of the startup log ('  0.1 seconds (IMPORT FAILED): path')."""
        text = self.log_text()
        block = text.rsplit("Import times for custom nodes:", 1)
        if len(block) < 2:
            return []
        lines = []
        for line in block[1].splitlines()[1:]:
            if not re.match(r"\s+[\d.]+ seconds", line):
                break
            lines.append(line.strip())
        return lines

    def pack_import_line(self, folder_name: str = PACK_FOLDER_NAME) -> str | None:
        for line in self.custom_node_import_lines():
            if line.rstrip("/").endswith(f"/{folder_name}") or line.rstrip("/").endswith(f"\\{folder_name}"):
                return line
        return None

    # ------------------------------------------------------------------------------------------------ HTTP API
    def _request(self, method: str, path: str, payload=None, timeout: float = 30):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 30):
        return self._request("GET", path, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else "")
        return self.get(path, timeout=120)

    def interrupt(self, prompt_id: str | None = None):
        return self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True):
        return self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def history(self, prompt_id: str) -> dict:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id, {})

    def queue(self, graph: dict, client_id: str | None = None) -> str:
        """POST an API-format graph; returns the prompt id. Raises PromptRejected on a validation error."""
        try:
            answer = self._request("POST", "/prompt", {"prompt": graph, "client_id": client_id or self.client_id})
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                info = json.loads(body)
            except ValueError:
                info = {"error": {"message": body}}
            error, node_errors = info.get("error", {}), info.get("node_errors", {})
            details = "; ".join(f"node {nid} ({ne.get('class_type')}): " +
                                ", ".join(f"{e.get('message')} {e.get('details', '')}".strip()
                                          for e in ne.get("errors", []))
                                for nid, ne in node_errors.items())
            raise PromptRejected(f"/prompt rejected the graph: {error.get('message', error)}"
                                 f"{' — ' + details if details else ''}", error, node_errors) from None
        return answer["prompt_id"]

    def run(self, graph: dict, timeout: float = 600.0, use_websocket: bool = True, on_message=None) -> RunResult:
        """Queue a graph, wait until it finished, return its history entry and output images.

        on_message(kind, data) is called for each websocket message of this prompt (progress, executing, ...).

        Raises ExecutionFailed (with the server's execution_error), ExecutionInterrupted, PromptRejected, or
        ComfyServerError (timeout, server died)."""
        if not self.alive():
            raise ComfyServerError(f"the server is not running{self._log_tail()}")
        t0 = time.perf_counter()
        messages = []
        ws = None
        if use_websocket:
            try:
                import websocket

                ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                                 timeout=2)
            except ImportError:
                ws = None
        try:
            prompt_id = self.queue(graph)
            if ws is not None:
                self._follow_websocket(ws, prompt_id, messages, t0 + timeout, on_message)
            entry = self._poll_history(prompt_id, t0 + timeout)
        finally:
            if ws is not None:
                ws.close()
        status = entry.get("status") or {}
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                raise ExecutionFailed(data)
            if kind == "execution_interrupted":
                raise ExecutionInterrupted(f"prompt {prompt_id} was interrupted at node {data.get('node_id')}")
        if status.get("status_str") not in (None, "success"):
            raise ComfyServerError(f"prompt {prompt_id} ended with status {status}{self._log_tail()}")
        return RunResult(prompt_id, entry, self._images(entry), messages, time.perf_counter() - t0)

    def _follow_websocket(self, ws, prompt_id, messages, deadline, on_message=None):
        import websocket

        while True:
            if time.perf_counter() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} did not finish in time{self._log_tail()}")
            if not self.alive():
                raise ComfyServerError(f"ComfyUI died (exit {self.proc.returncode}) while running prompt "
                                       f"{prompt_id}{self._log_tail()}")
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                return  # fall back to polling /history
            if not isinstance(raw, str):
                continue  # binary preview frames
            msg = json.loads(raw)
            kind, data = msg.get("type"), msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            messages.append((kind, data))
            if on_message is not None:
                on_message(kind, data)
            if kind == "execution_error":
                raise ExecutionFailed(data)
            if kind == "execution_interrupted":
                raise ExecutionInterrupted(f"prompt {prompt_id} was interrupted at node {data.get('node_id')}")
            if kind in ("execution_success",) or (kind == "executing" and data.get("node") is None
                                                   and data.get("prompt_id") == prompt_id):
                return

    def _poll_history(self, prompt_id, deadline) -> dict:
        while True:
            entry = self.history(prompt_id)
            if entry:  # ComfyUI writes the history entry when the prompt is done (task_done)
                return entry
            if not self.alive():
                raise ComfyServerError(f"ComfyUI died (exit {self.proc.returncode}) while running prompt "
                                       f"{prompt_id}{self._log_tail()}")
            if time.perf_counter() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} did not finish in time{self._log_tail()}")
            time.sleep(0.2)

    def _images(self, entry) -> list:
        folders = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                base = folders.get(image.get("type", "output"), self.output_dir)
                paths.append(base / image.get("subfolder", "") / image["filename"])
        return paths
