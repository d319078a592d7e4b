"""install-service / uninstall-service: the LaunchAgent plist and the systemd user unit.

Linux cannot load a LaunchAgent, so the plist is validated with plistlib and Debian's plistutil;
the unit is validated with `systemd-analyze verify`. Both are parsed, not grepped. Paths with
spaces (and a `%`) check the quoting. Loading them: test_login_service.py (the stand-in
launchd, a real systemd user manager) and test_macos_service.py (the real launchctl).
"""

from __future__ import annotations

import configparser
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_local import config
from mlx_local.project import Project
from mlx_local.service import launchctl, launchd, systemctl, systemd, unitenv
from mlx_local.service.kind import KINDS
from tests.helpers import run_cli

needs_plistutil = pytest.mark.skipif(
    shutil.which("plistutil") is None, reason="plistutil missing (run .ci/install-test-tools)"
)
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (run .ci/install-test-tools)",
)


@pytest.fixture
def spaced(tmp_path: Path) -> tuple[Project, Path]:
    """A project whose root has spaces, and a python reachable through a spaced, %-ed path."""
    root = tmp_path / "my projects" / "mlx local"
    root.mkdir(parents=True)
    bin_dir = tmp_path / "venv 100%" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.symlink_to(sys.executable)
    return Project(root), python


def spec_for(proj: Project, python: Path) -> unitenv.ServiceSpec:
    return unitenv.service_spec(proj, config.load(proj), python, environ={"HF_HOME": "/hf cache"})


def test_plist_has_absolute_paths_and_launchd_settings(spaced: tuple[Project, Path]) -> None:
    proj, python = spaced
    data = plistlib.loads(launchd.render(spec_for(proj, python)))
    assert data["Label"] == "com.local.mlx-local"
    assert data["ProgramArguments"] == [str(python), "-m", "mlx_local.cli", "serve", "--log"]
    assert data["WorkingDirectory"] == str(proj.root)
    env = data["EnvironmentVariables"]
    assert env["MLX_LOCAL_HOME"] == str(proj.root)
    assert env["PATH"].split(":")[0] == str(python.parent)
    assert env["HF_HOME"] == "/hf cache"
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["ThrottleInterval"] == 30
    assert data["ProcessType"] == "Interactive"
    assert data["LowPriorityIO"] is False
    assert data["ExitTimeOut"] == 15
    log = proj.root / "logs" / "service.log"
    assert data["StandardOutPath"] == data["StandardErrorPath"] == str(log)
    for value in [*data["ProgramArguments"][:1], data["WorkingDirectory"], env["PATH"]]:
        assert Path(value.split(":")[0]).is_absolute()
    assert "api_key" not in str(data).lower()


@needs_plistutil
def test_plist_passes_plistutil(spaced: tuple[Project, Path], tmp_path: Path) -> None:
    proj, python = spaced
    xml = tmp_path / "agent.plist"
    xml.write_bytes(launchd.render(spec_for(proj, python)))
    binary = tmp_path / "agent.bin"
    result = subprocess.run(
        ["plistutil", "-i", str(xml), "-o", str(binary), "-f", "bin"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert binary.read_bytes().startswith(b"bplist00")
    assert plistlib.loads(binary.read_bytes()) == plistlib.loads(xml.read_bytes())


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keep the case of systemd's keys
    parser.read_string(text)
    return parser


def unescape(word: str) -> str:
    return word.replace("%%", "%").replace("$$", "$")


def test_unit_has_absolute_paths_and_restart_on_failure(spaced: tuple[Project, Path]) -> None:
    proj, python = spaced
    unit = parse_unit(systemd.render(spec_for(proj, python)))
    service = unit["Service"]
    argv = [unescape(word) for word in shlex.split(service["ExecStart"])]
    assert argv == [str(python), "-m", "mlx_local.cli", "serve", "--log"]
    assert Path(argv[0]).is_absolute()
    assert unescape(service["WorkingDirectory"]) == str(proj.root)
    env = dict(unescape(pair).split("=", 1) for pair in shlex.split(service["Environment"]))
    assert env["MLX_LOCAL_HOME"] == str(proj.root)
    assert env["HF_HOME"] == "/hf cache"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert service["TimeoutStopSec"] == "15"
    log = proj.root / "logs" / "service.log"
    assert unescape(service["StandardOutput"]) == f"append:{log}"
    assert unit["Install"]["WantedBy"] == "default.target"


def test_a_fractional_stop_timeout_rounds_up_never_to_0(spaced: tuple[Project, Path]) -> None:
    """Issue 22 #7: launchd reads ExitTimeOut 0 as "wait forever", systemd TimeoutStopSec=0
    alike; stop_timeout = 0.5 must become 1 second, not 0."""
    proj, python = spaced
    (proj.root / "config.toml").write_text("[service]\nstop_timeout = 0.5\n")
    spec = spec_for(proj, python)
    assert plistlib.loads(launchd.render(spec))["ExitTimeOut"] == 1
    assert parse_unit(systemd.render(spec))["Service"]["TimeoutStopSec"] == "1"


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(spaced: tuple[Project, Path], tmp_path: Path) -> None:
    proj, python = spaced
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    path = unit_dir / "mlx-local.service"
    path.write_text(systemd.render(spec_for(proj, python)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert str(path) not in result.stderr, result.stderr  # no warning about our unit
    # The check is real: a unit whose program does not exist fails.
    broken = unit_dir / "broken.service"
    broken.write_text(path.read_text().replace(str(python).replace("%", "%%"), "/no such/py"))
    bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True)
    assert bad.returncode != 0


@pytest.mark.parametrize("kind", KINDS)
def test_install_and_uninstall_are_idempotent(kind: str, tmp_path: Path) -> None:
    root = tmp_path / "project with space"
    root.mkdir()
    dest = tmp_path / "agents dir"
    args = ["--kind", kind, "--dest", str(dest), "--write-only"]
    first = run_cli(["install-service", *args], root)
    assert first.returncode == 0, first.stderr
    path = dest / (launchd.file_name() if kind == "launchd" else systemd.file_name())
    assert "wrote" in first.stdout and path.is_file()
    content = path.read_bytes()
    second = run_cli(["install-service", *args], root)
    assert second.returncode == 0 and "unchanged" in second.stdout
    assert path.read_bytes() == content
    dry = run_cli(["install-service", *args, "--dry-run"], root)
    assert dry.stdout.encode() == content  # stdout is exactly the file
    assert f"would write {path}" in dry.stderr
    removed = run_cli(["uninstall-service", *args], root)
    assert removed.returncode == 0 and not path.exists()
    again = run_cli(["uninstall-service", *args], root)
    assert again.returncode == 0 and "not installed" in again.stdout


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = run_cli(["install-service", "--dest", str(dest), "--dry-run"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ProgramArguments" in result.stdout or "ExecStart=" in result.stdout
    assert not dest.exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux only")
def test_install_without_a_user_bus_says_so(tmp_path: Path) -> None:
    if systemctl.bus_available():
        pytest.skip("a systemd user instance is running here")
    dest = tmp_path / "dest"
    result = run_cli(["install-service", "--dest", str(dest)], tmp_path)
    assert result.returncode == 1
    assert "no systemd user instance" in result.stderr and "--write-only" in result.stderr
    assert not dest.exists()


def test_a_stored_key_is_a_credential_of_the_unit_and_nothing_of_the_plist(tmp_path: Path) -> None:
    """api_key_stored: the unit loads the 0600 credential file (LoadCredential=), the plist
    names nothing (serve reads the Keychain); neither holds a key."""
    (tmp_path / "config.toml").write_text("api_key_stored = true\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg config")}
    unit = run_cli(["install-service", "--kind", "systemd", "--dry-run"], tmp_path, env=env)
    assert unit.returncode == 0, unit.stderr
    credential = tmp_path / "xdg config" / "credstore" / "mlx-local-api-key"
    lines = parse_unit(unit.stdout)["Service"]
    assert lines["LoadCredential"] == f"mlx-local-api-key:{credential}"
    plist = run_cli(["install-service", "--kind", "launchd", "--dry-run"], tmp_path, env=env)
    data = plistlib.loads(plist.stdout.encode())
    assert data["EnvironmentVariables"]["MLX_LOCAL_SERVICE_MANAGER"] == "launchd"
    assert "credstore" not in plist.stdout


def test_launchctl_print_is_read_at_the_top_level_only() -> None:
    """`launchctl print` nests blocks (endpoints, event triggers) with keys of the same names;
    the job's own are the lines one tab in."""
    text = (
        "gui/501/com.local.mlx-local = {\n\tactive count = 0\n\tstate = spawn scheduled\n"
        "\targuments = {\n\t\t/venv/bin/python\n\t}\n\truns = 3\n"
        "\tlast terminating signal = Abort trap: 6\n\tendpoints = {\n"
        '\t\t"com.example" = {\n\t\t\tstate = active\n\t\t\tpid = 77\n\t\t}\n\t}\n}\n'
    )
    fields = launchctl._fields(text)
    assert fields["state"] == "spawn scheduled" and "pid" not in fields
    assert launchctl._last_exit(fields) == -6 and fields["runs"] == "3"
