"""A server under benchmark: start it, time streaming requests, read its peak memory, stop it."""

from __future__ import annotations

import http.client
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..processes import free_port, terminate
from ..service.process import wait_healthy

START_TIMEOUT = 300.0
STOP_GRACE = 30.0
READ_TIMEOUT = 300.0


def peak_rss_bytes(pid: int) -> int | None:
    """Peak resident memory of a live process: VmHWM on Linux, current RSS elsewhere."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None
    if platform.system() == "Darwin":
        result = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True)
        text = result.stdout.decode().strip()
        return int(text) * 1024 if text.isdigit() else None
    return None


@dataclass
class Reply:
    """One streamed completion, timed on the client."""

    ttft: float
    total: float
    prompt_tokens: int | None
    completion_tokens: int | None
    text: str

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first one."""
        if not self.completion_tokens or self.completion_tokens < 2 or self.total <= self.ttft:
            return None
        return (self.completion_tokens - 1) / (self.total - self.ttft)


class BenchServer:
    """One `python -m mlx_lm.server` process, started in its own session and always stopped."""

    def __init__(
        self,
        python: Path,
        model: Path,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [
            str(python), "-m", "mlx_lm.server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> BenchServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(self.command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        if not wait_healthy(
            "127.0.0.1", self.port, START_TIMEOUT, lambda: self.process.poll() is None, 0.2
        ):
            tail = self.log_path.read_text(errors="replace")[-1500:]
            raise UserError(f"the server did not answer /health; log tail:\n{tail}")

    def peak_rss(self) -> int | None:
        """Peak resident memory of the server process so far."""
        return peak_rss_bytes(self.process.pid) if self.process else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        process = self.process
        if process is not None and process.poll() is None:
            terminate(process.pid, STOP_GRACE)
            process.wait()

    def chat(
        self, messages: list[dict], max_tokens: int, logit_bias: Mapping[int, float] | None = None
    ) -> Reply:
        """Send a streaming chat completion; time the first data chunk and the last."""
        body = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if logit_bias:
            body["logit_bias"] = {str(k): v for k, v in logit_bias.items()}
        return stream_request(self.port, "/v1/chat/completions", body)


def stream_request(port: int, path: str, body: dict, timeout: float = READ_TIMEOUT) -> Reply:
    """POST `body` with stream=true; parse server-sent events; time them. `timeout` bounds
    each read: the server sends keepalive comments while it processes a long prompt."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    connection.request("POST", path, payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        detail = response.read()[:300].decode(errors="replace")
        connection.close()
        raise UserError(f"the server answered {response.status} to {path}: {detail}")
    first = last = None
    usage: dict = {}
    text = []
    try:
        for raw in response:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators and ": keepalive" comments
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                delta = chunk["choices"][0].get("delta") or {}
                text.append(delta.get("content") or chunk["choices"][0].get("text") or "")
            usage = chunk.get("usage") or usage
    except TimeoutError:
        raise UserError(f"the server sent nothing for {timeout:.0f}s on {path}") from None
    finally:
        connection.close()
    if first is None:
        raise UserError(f"the server streamed no completion for {path}")
    return Reply(
        ttft=first - start,
        total=last - start,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        text="".join(text),
    )
