"""The running server's GET /metrics (patch 0008), read into a small summary for `status`.

The Prometheus text format is parsed here (prometheus_client is a test-only dependency)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..config import Config
from ..errors import UserError
from . import command, process

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class Unavailable(Exception):
    """The server gave no metrics (not the patched server, a refused key, no answer)."""


@dataclass(frozen=True)
class Summary:
    """What `status` shows of the server's metrics."""

    requests: int
    prompt_tokens_processed: int
    prompt_tokens_reused_memory: int
    prompt_tokens_reused_disk: int
    cache_hit_rate: float | None  # reused / (processed + reused), None before any prompt
    generation_tokens: int
    time_to_first_token_mean_seconds: float | None
    decode_tokens_per_second_mean: float | None
    cache_entries_memory: int
    cache_bytes_memory: int
    cache_entries_disk: int
    cache_bytes_disk: int
    memory_active_bytes: int
    memory_peak_bytes: int
    memory_cache_bytes: int
    disk_blocks: int = 0
    disk_blocks_shared: int = 0
    disk_written_bytes: int = 0
    # --idle-unload (patch 0015): loading, loaded, unloading or unloaded; None without it
    model_state: str | None = None
    model_state_since: float | None = None  # when that state began (Unix time)
    idle_unload_seconds: float = 0.0  # the setting; 0: off
    idle_unloads: int = 0
    idle_reloads: int = 0
    idle_reload_seconds_mean: float | None = None
    idle_last_reload_seconds: float | None = None

    @property
    def activity(self) -> str | None:
        """What `status` adds to the state when the model is not simply loaded."""
        if self.model_state == "unloaded":
            return "idle (model unloaded)"
        if self.model_state == "unloading":
            return "idle (unloading the model)"
        if self.model_state == "loading":
            return "loading the model" + (" again" if self.idle_unloads else "")
        return None


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by (name, sorted labels)."""
    samples: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise Unavailable(f"not the Prometheus text format: {line[:80]!r}")
        name, body, value = match.groups()
        labels = tuple(
            sorted(
                (key, re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group()], raw))
                for key, raw in _LABEL.findall(body or "")
            )
        )
        try:
            samples[(name, labels)] = float(value)
        except ValueError:
            raise Unavailable(f"not a sample value: {line[:80]!r}") from None
    return samples


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((f"mlx_lm_{name}", tuple(sorted(labels.items()))), 0.0)


def _mean(samples: Samples, histogram: str) -> float | None:
    count = _get(samples, f"{histogram}_count")
    return _get(samples, f"{histogram}_sum") / count if count else None


def summarize(samples: Samples) -> Summary:
    """The figures `status` shows, from the parsed samples."""
    if ("mlx_lm_requests_total", ()) not in samples:
        raise Unavailable("no mlx_lm_ metrics in the answer")

    def n(name: str, **labels: str) -> int:
        return int(_get(samples, name, **labels))

    states = [
        dict(labels).get("state")
        for (name, labels), value in samples.items()
        if name == "mlx_lm_model_state" and value == 1
    ]
    reloads = n("idle_reloads_total")
    processed = n("prompt_tokens_processed_total")
    memory = n("prompt_tokens_reused_total", tier="memory")
    disk = n("prompt_tokens_reused_total", tier="disk")
    prompt = processed + memory + disk
    return Summary(
        requests=n("requests_total"),
        prompt_tokens_processed=processed,
        prompt_tokens_reused_memory=memory,
        prompt_tokens_reused_disk=disk,
        cache_hit_rate=(memory + disk) / prompt if prompt else None,
        generation_tokens=n("generation_tokens_total"),
        time_to_first_token_mean_seconds=_mean(samples, "time_to_first_token_seconds"),
        decode_tokens_per_second_mean=_mean(samples, "decode_tokens_per_second"),
        cache_entries_memory=n("prompt_cache_entries", tier="memory"),
        cache_bytes_memory=n("prompt_cache_bytes", tier="memory"),
        cache_entries_disk=n("prompt_cache_entries", tier="disk"),
        cache_bytes_disk=n("prompt_cache_bytes", tier="disk"),
        memory_active_bytes=n("memory_active_bytes"),
        memory_peak_bytes=n("memory_peak_bytes"),
        memory_cache_bytes=n("memory_cache_bytes"),
        disk_blocks=n("prompt_cache_disk_blocks"),
        disk_blocks_shared=n("prompt_cache_disk_blocks_shared"),
        disk_written_bytes=n("prompt_cache_disk_written_bytes_total"),
        model_state=states[0] if states else None,
        model_state_since=_get(samples, "model_state_start_time_seconds") if states else None,
        idle_unload_seconds=_get(samples, "idle_unload_seconds"),
        idle_unloads=n("idle_unloads_total"),
        idle_reloads=reloads,
        idle_reload_seconds_mean=_mean(samples, "idle_reload_seconds"),
        idle_last_reload_seconds=_get(samples, "idle_last_reload_seconds") if reloads else None,
    )


def fetch(host: str, port: int, key: str | None, timeout: float = 3.0) -> Summary:
    """GET /metrics from the server at host:port and summarize it; Unavailable if it can't."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{process.base_url(host, port)}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        reason = {401: "the API key was refused", 404: "this server has no /metrics"}
        raise Unavailable(reason.get(error.code, f"HTTP {error.code}")) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise Unavailable(f"no answer ({error})") from None
    return summarize(parse(text))


def read(config: Config, host: str, port: int) -> tuple[Summary | None, str]:
    """The summary of the server's metrics with the configured API key, or (None, why not)."""
    try:
        key = command.api_key(config)
    except UserError:
        key = None
    try:
        return fetch(host, port, key), ""
    except Unavailable as error:
        return None, str(error)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def panel_rows(summary: Summary | None, detail: str) -> list[tuple[str, str]]:
    """Rows for the status panel: the figures, or why there are none."""
    if summary is None:
        return [("metrics", f"unavailable: {detail}")] if detail else []
    s = summary
    rows = _idle_rows(s)
    hit = "-" if s.cache_hit_rate is None else f"{s.cache_hit_rate:.0%}"
    ttft = s.time_to_first_token_mean_seconds
    decode = s.decode_tokens_per_second_mean
    return rows + [
        ("requests", f"{s.requests}"),
        (
            "prompt tokens",
            f"{s.prompt_tokens_processed} processed, reused {s.prompt_tokens_reused_memory} "
            f"from memory and {s.prompt_tokens_reused_disk} from disk",
        ),
        ("cache hit rate", hit),
        ("generated", f"{s.generation_tokens} tokens"),
        ("first token", "-" if ttft is None else f"{ttft:.3f} s mean"),
        ("decode", "-" if decode is None else f"{decode:.1f} tok/s mean"),
        (
            "prompt cache",
            f"{s.cache_entries_memory} in memory ({_size(s.cache_bytes_memory)}), "
            f"{s.cache_entries_disk} on disk ({_size(s.cache_bytes_disk)})",
        ),
        (
            "disk blocks",
            f"{s.disk_blocks} ({s.disk_blocks_shared} shared), "
            f"{_size(s.disk_written_bytes)} written in this run",
        ),
        (
            "mlx memory",
            f"active {_size(s.memory_active_bytes)}, peak {_size(s.memory_peak_bytes)}, "
            f"cache {_size(s.memory_cache_bytes)}",
        ),
    ]


def _idle_rows(s: Summary) -> list[tuple[str, str]]:
    """The idle unload's row: the setting, unloads and reloads, the time reloads took."""
    if not s.idle_unload_seconds:
        return []
    text = f"after {s.idle_unload_seconds:g} s without a request; {s.idle_unloads} unloads"
    text += f", {s.idle_reloads} reloads"
    if s.idle_reload_seconds_mean is not None and s.idle_last_reload_seconds is not None:
        text += (
            f" ({s.idle_reload_seconds_mean:.2f} s mean, last {s.idle_last_reload_seconds:.2f} s)"
        )
    return [("idle unload", text)]
