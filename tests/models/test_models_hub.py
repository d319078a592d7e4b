"""convert-model from hub ids, without the real hub: a Hugging Face cache laid out as
huggingface_hub writes it (HF_HUB_OFFLINE=1), and a stand-in hub served on 127.0.0.1
(HF_ENDPOINT) for downloads, unknown ids, gated repos and disk-space refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlx_local.models.manifest import MANIFEST_FILE
from tests.conftest import PatchedRuntime, make_project
from tests.helpers import VENV_BIN

COMMIT = hashlib.sha1(b"mlx-local test commit").hexdigest()
REPO = "mlx-local-tests/demo-tiny"
DEMO_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
]


def blob_id(data: bytes, lfs: bool) -> str:
    """The name huggingface_hub gives a blob: sha256 for LFS files, the git blob id else."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(cache: Path, repo: str, commit: str, source: Path) -> Path:
    """blobs/, snapshots/<commit>/ (relative symlinks) and refs/main, as huggingface_hub does."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in DEMO_FILES:
        data = (source / name).read_bytes()
        blob = blob_id(data, name.endswith(".safetensors"))
        (folder / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def hub_env(
    tmp_path: Path, runtime: PatchedRuntime | None, home: Path, **extra: str
) -> dict[str, str]:
    """Environment of a user with no token and their own hub cache. Without a runtime, any
    attempt to run mlx_lm fails: the refusals under test must come before that."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return env | {
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLX_LOCAL_HOME": str(home),
        "MLX_LOCAL_PYTHON": str(runtime.python if runtime else tmp_path / "no-python"),
        **extra,
    }


def convert(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "convert-model"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def manifest_of(home: Path, name: str) -> dict:
    return json.loads((home / "local-models" / name / MANIFEST_FILE).read_text())


# ---------------------------------------------------------------- offline, from the cache


@pytest.mark.slow
def test_offline_hub_id_resolves_through_the_cache(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime
) -> None:
    home = make_project(tmp_path / "project")
    write_hub_cache(tmp_path / "hub-cache", REPO, COMMIT, demo_model)
    env = hub_env(tmp_path, patched_runtime, home, HF_HUB_OFFLINE="1")

    done = convert(env, REPO, "--bits", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "offline" in done.stdout
    manifest = manifest_of(home, "demo-tiny-MLX-8bit")
    assert manifest["source"] == {
        "kind": "hub",
        "repo_id": REPO,
        "revision": COMMIT,
        "requested_revision": None,
    }
    assert manifest["verification"]["ok"] is True

    by_sha = convert(env, REPO, "--revision", COMMIT, "--name", "pinned", "--dry-run")
    assert by_sha.returncode == 0, by_sha.stderr
    assert COMMIT in by_sha.stdout

    missing = convert(env, REPO, "--revision", "v2")
    assert missing.returncode == 1
    assert "nor in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in missing.stderr


def test_offline_unknown_hub_id_says_it_is_not_cached(tmp_path: Path) -> None:
    home = make_project(tmp_path / "project")
    env = hub_env(tmp_path, None, home, HF_HUB_OFFLINE="1")
    done = convert(env, "nobody/nothing-here")
    assert done.returncode == 1
    assert "nobody/nothing-here is neither a local folder nor in the local" in done.stderr
    assert list((home / "local-models").iterdir()) == []


# ---------------------------------------------------------------- a stand-in hub on 127.0.0.1


class StandInHub:
    """Just enough of the hub's HTTP API for huggingface_hub: model info, tree, resolve."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[str] = []

    def add(self, repo: str, files: dict[str, bytes], **info: object) -> None:
        self.repos[repo] = {"files": files, "info": info}

    def model_info(self, repo: str) -> dict:
        entry = self.repos[repo]
        siblings = [
            {"rfilename": name, "size": len(data), "blobId": blob_id(data, False)}
            for name, data in entry["files"].items()
        ]
        return {"id": repo, "sha": COMMIT, "private": False, "siblings": siblings} | entry["info"]

    def tree(self, repo: str) -> list[dict]:
        out = []
        for name, data in self.repos[repo]["files"].items():
            item = {"type": "file", "path": name, "size": len(data), "oid": blob_id(data, False)}
            if name.endswith(".safetensors"):
                lfs_id = blob_id(data, True)
                item["lfs"] = {"oid": lfs_id, "size": len(data), "pointerSize": 134}
            out.append(item)
        return out


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: object) -> None:
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _route(self) -> None:
            path = self.path.split("?")[0]
            hub.requests.append(f"{self.command} {path}")
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    self._send(
                        404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
                    )
                elif len(parts) > 4 and parts[4] == "tree":
                    self._json(hub.tree(repo))
                else:
                    self._json(hub.model_info(repo))
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                files = hub.repos.get(repo, {}).get("files", {})
                if name not in files:
                    self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                    return
                data = files[name]
                etag = blob_id(data, name.endswith(".safetensors"))
                self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT})
                return
            self._send(404, b"", {})

        do_GET = do_HEAD = _route

    return Handler


@pytest.fixture
def stand_in_hub() -> Iterator[tuple[StandInHub, str]]:
    hub = StandInHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def demo_files(demo_model: Path) -> dict[str, bytes]:
    return {name: (demo_model / name).read_bytes() for name in DEMO_FILES}


QWEN3 = {"config": {"model_type": "qwen3"}}


@pytest.mark.slow
def test_hub_download_lands_in_the_hub_cache_and_converts(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime, stand_in_hub
) -> None:
    hub, url = stand_in_hub
    hub.add(REPO, demo_files(demo_model), **QWEN3)
    home = make_project(tmp_path / "project")
    env = hub_env(tmp_path, patched_runtime, home, HF_ENDPOINT=url)

    done = convert(env, REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "into the hub cache" in done.stdout
    manifest = manifest_of(home, "demo-tiny-MLX-4bit")
    assert manifest["source"]["revision"] == COMMIT
    assert f"GET /{REPO}/resolve/{COMMIT}/model.safetensors" in hub.requests
    assert not any("README.md" in r for r in hub.requests if "resolve" in r), "not needed"
    cached = tmp_path / "hub-cache" / "models--mlx-local-tests--demo-tiny" / "snapshots" / COMMIT
    assert (cached / "model.safetensors").read_bytes() == (
        demo_model / "model.safetensors"
    ).read_bytes()

    hub.requests.clear()
    again = convert(env, REPO, "--name", "second", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "into the hub cache" not in again.stdout, "everything is cached: nothing to download"
    assert not any(r.startswith("GET") and "resolve" in r for r in hub.requests)


def test_unknown_hub_id_is_one_clear_line(tmp_path: Path, stand_in_hub) -> None:
    _, url = stand_in_hub
    home = make_project(tmp_path / "project")
    done = convert(hub_env(tmp_path, None, home, HF_ENDPOINT=url), "nobody/nothing")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: unknown hub id nobody/nothing: no such model on the Hugging Face hub "
        "(if it is private, log in with `hf auth login` or set HF_TOKEN)"
    ]


def test_gated_repo_without_token_is_refused(
    tmp_path: Path, demo_model: Path, stand_in_hub
) -> None:
    hub, url = stand_in_hub
    hub.add("org/gated", demo_files(demo_model), gated="manual", **QWEN3)
    home = make_project(tmp_path / "project")
    done = convert(hub_env(tmp_path, None, home, HF_ENDPOINT=url), "org/gated")
    assert done.returncode == 1
    assert "org/gated is a gated model" in done.stderr and "HF_TOKEN" in done.stderr
    assert not any("resolve" in r for r in hub.requests)


@pytest.mark.slow
def test_hub_download_bigger_than_the_disk_is_refused_before_downloading(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime, stand_in_hub
) -> None:
    hub, url = stand_in_hub
    files = demo_files(demo_model)
    hub.add("org/huge", files, **QWEN3)
    huge = 10**15  # 1 PB of weights, as the hub reports the file size
    info = hub.model_info("org/huge")
    for sibling in info["siblings"]:
        if sibling["rfilename"] == "model.safetensors":
            sibling["size"] = huge
    hub.add("org/huge", files, siblings=info["siblings"], **QWEN3)
    home = make_project(tmp_path / "project")

    done = convert(hub_env(tmp_path, patched_runtime, home, HF_ENDPOINT=url), "org/huge")
    assert done.returncode == 1, done.stdout
    line = done.stderr.strip()
    assert "not enough disk space" in line and "download 1000000.00 GB" in line, line
    assert not any("resolve" in r for r in hub.requests)
    assert list((home / "local-models").iterdir()) == []


@pytest.mark.slow
def test_hub_architecture_mlx_lm_lacks_is_refused_before_downloading(
    tmp_path: Path, demo_model: Path, patched_runtime: PatchedRuntime, stand_in_hub
) -> None:
    hub, url = stand_in_hub
    hub.add("org/odd", demo_files(demo_model), config={"model_type": "no_such_arch"})
    home = make_project(tmp_path / "project")
    done = convert(hub_env(tmp_path, patched_runtime, home, HF_ENDPOINT=url), "org/odd")
    assert done.returncode == 1
    assert "unsupported architecture 'no_such_arch'" in done.stderr
    assert not any("resolve" in r for r in hub.requests)
