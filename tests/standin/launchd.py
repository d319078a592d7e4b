"""A stand-in for launchd, macOS's service manager, so that the launchd side of mlx-local runs
on Linux, where launchd cannot. It is not launchd: it models what mlx-local relies on.

Run it as `python launchd.py --dir D [--login-agents DIR]`; the stand-in `launchctl` (bin/) talks
to it over D/launchd.sock (found through $STANDIN_LAUNCHD_DIR). What it models, and from where:

- launchctl(1): one domain per user, `gui/<uid>`, holding services by label; `bootstrap`,
  `bootout`, `print`, `kickstart [-k]`, `kill`, `enable`, `disable`, `print-disabled`, `list`
  with their output and exit codes. `disable` "persists across boots": the overrides live in
  D/overrides.json and survive a restart of the stand-in (a new login).
- launchd.plist(5): ProgramArguments, EnvironmentVariables, WorkingDirectory,
  StandardOutPath/StandardErrorPath (appended to), RunAtLoad, KeepAlive {SuccessfulExit=false}
  (restart unless the job exited with status 0; a death by signal is not a successful exit),
  ThrottleInterval (default 10), ExitTimeOut (SIGTERM, then SIGKILL; default 20; 0 = never),
  AbandonProcessGroup (default: the job's leftover process group gets SIGTERM when it dies).
- launchd-842's core.c (the last open-source launchd, github.com/freebsd/openlaunchd): a job
  that ran less than its ThrottleInterval is respawned after the rest of it ("Throttling
  respawn: Will start in N seconds"), LAUNCHD_DEFAULT_EXIT_TIMEOUT 20, killpg(SIGTERM) of the
  dead job's process group, KeepAlive's "good exit" = exited with status 0.
- Reports from real Macs (GitHub: Layr-Labs/d-inference#1102, openclaw/openclaw#136453,
  Opendray/opendray#211, kirodotdev/KiroCrew#1562, NousResearch/hermes-agent#5536,
  Homebrew/homebrew-core#132781, Layr-Labs/d-inference#496): `bootout` returns at once after
  SIGTERM and launchd keeps the label for a cleanup window ("scheduling cleanup in 5 sec after
  sending Terminated: 15"); a `bootstrap` meanwhile fails with `Bootstrap failed: 5:
  Input/output error` (37 underneath), as does one of a disabled service; bootstrapping a
  loaded service fails with 37 (Operation already in progress); an unknown service is 113
  (`Could not find service "X" in domain for user gui: 501`); `kickstart -k` kills with
  SIGKILL; a disabled agent is not loaded at the next login.

Not modelled: Mach services, sockets, other domains (system, user/<uid>), root's richer errors
(119 for a disabled service), most of `print`'s many lines.

The cleanup window is $STANDIN_LAUNCHD_CLEANUP_SECONDS (default 5, as on macOS): tests shorten
it, but it is always there. A job leaves the domain once its process has exited and the window
since its SIGTERM has passed. The stand-in writes launchd's own messages to D/launchd.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import plistlib
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_THROTTLE = 10  # launchd.plist(5) ThrottleInterval; LAUNCHD_MIN_JOB_RUN_TIME
DEFAULT_EXIT_TIMEOUT = 20  # LAUNCHD_DEFAULT_EXIT_TIMEOUT
CLEANUP_ENV = "STANDIN_LAUNCHD_CLEANUP_SECONDS"
DEFAULT_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
EX_CONFIG = 78  # what launchd records for a job whose program cannot be spawned
TICK = 0.05

ERRORS = {
    2: "No such file or directory",
    3: "No such process",
    5: "Input/output error",
    37: "Operation already in progress",
    113: "Could not find specified service",
}


class Failure(Exception):
    """A launchctl error: exit code and stderr text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class Job:
    """One service in the domain: its plist and the state launchd keeps about it."""

    label: str
    path: str
    plist: dict
    process: subprocess.Popen | None = None
    runs: int = 0
    started_at: float = 0.0
    last_exit: int | None = None  # exit status, or -signal for a death by signal
    respawn_at: float | None = None  # KeepAlive: throttled respawn pending
    kill_at: float | None = None  # ExitTimeOut elapsed: SIGKILL
    booting_out: bool = False
    remove_at: float = 0.0  # bootout: end of the cleanup window
    respawn_after_kill: bool = False  # kickstart -k
    out_files: list = field(default_factory=list)

    @property
    def throttle(self) -> int:
        return int(self.plist.get("ThrottleInterval", DEFAULT_THROTTLE))

    @property
    def exit_timeout(self) -> int:
        return int(self.plist.get("ExitTimeOut", DEFAULT_EXIT_TIMEOUT))

    @property
    def state(self) -> str:
        if self.process is not None:
            return "running"
        return "spawn scheduled" if self.respawn_at is not None else "not running"

    def keeps_alive_after(self, status: int) -> bool:
        """KeepAlive: true restarts always; {SuccessfulExit: false} unless status is 0."""
        keep = self.plist.get("KeepAlive", False)
        if isinstance(keep, bool):
            return keep
        if "SuccessfulExit" in keep:
            return (status == 0) == bool(keep["SuccessfulExit"])
        return False


def describe_exit(status: int) -> tuple[str, str]:
    """launchctl print's line for an exit: exit code, or terminating signal."""
    if status < 0:
        name = signal.strsignal(-status) or f"signal {-status}"
        return "last terminating signal", f"{name}: {-status}"
    suffix = ": EX_CONFIG" if status == EX_CONFIG else ""
    return "last exit code", f"{status}{suffix}"


class Launchd:
    """The domain gui/<uid> and its jobs; every launchctl request is handled here."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.uid = os.getuid()
        self.domain = f"gui/{self.uid}"
        self.jobs: dict[str, Job] = {}
        self.overrides_file = state_dir / "overrides.json"
        self.log_file = (state_dir / "launchd.log").open("a", buffering=1)
        self.cleanup = float(os.environ.get(CLEANUP_ENV, "5"))

    # -- bookkeeping -------------------------------------------------------------------------

    def log(self, label: str, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.log_file.write(f"{stamp} launchd: [{self.domain}/{label}] {message}\n")

    def overrides(self) -> dict[str, bool]:
        """label -> disabled, as `launchctl disable/enable` left it (persists across boots)."""
        try:
            return json.loads(self.overrides_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def set_disabled(self, label: str, disabled: bool) -> None:
        data = {**self.overrides(), label: disabled}
        tmp = self.overrides_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.overrides_file)

    def service(self, target: str) -> Job:
        """The job named by a service target gui/<uid>/<label>."""
        domain, _, label = target.rpartition("/")
        job = self.jobs.get(label) if domain == self.domain else None
        if job is None:
            where = domain.replace("/", ": ")
            raise Failure(113, f'Could not find service "{label}" in domain for user {where}')
        return job

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, job: Job) -> None:
        plist = job.plist
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": os.environ.get("HOME", "/"),
            "USER": os.environ.get("USER", "root"),
            "LOGNAME": os.environ.get("LOGNAME", os.environ.get("USER", "root")),
            "SHELL": os.environ.get("SHELL", "/bin/sh"),
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
            "XPC_SERVICE_NAME": job.label,
            "XPC_FLAGS": "0x0",
            **plist.get("EnvironmentVariables", {}),
        }
        argv = plist.get("ProgramArguments") or [plist["Program"]]
        files = []
        for key in ("StandardOutPath", "StandardErrorPath"):
            files.append(open(plist[key], "ab") if key in plist else subprocess.DEVNULL)  # noqa: SIM115
        job.respawn_at = None
        job.runs += 1
        job.started_at = time.monotonic()
        try:
            job.process = subprocess.Popen(
                argv,
                executable=plist.get("Program"),
                env=env,
                cwd=plist.get("WorkingDirectory", "/"),
                stdin=subprocess.DEVNULL,
                stdout=files[0],
                stderr=files[1],
                start_new_session=True,
            )
        except OSError as error:
            self.log(job.label, f"Service could not be spawned: {error}")
            job.process = None
            self.exited(job, EX_CONFIG)
        finally:
            for handle in files:
                if handle is not subprocess.DEVNULL:
                    handle.close()
        if job.process is not None:
            self.log(job.label, f"Successfully spawned {argv[0]}[{job.process.pid}]")

    def signal(self, job: Job, signum: int) -> None:
        if job.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.process.pid, signum)

    def exited(self, job: Job, status: int) -> None:
        """The job's process is gone: record it, kill strays, then KeepAlive or removal."""
        job.last_exit = status
        job.kill_at = None
        if job.process is not None:
            pid = job.process.pid
            job.process = None
            what, value = describe_exit(status)
            self.log(job.label, f"exited ({what} = {value}) [{pid}]")
            if not job.plist.get("AbandonProcessGroup", False):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGTERM)  # the dead job's process group
        if job.booting_out:
            return
        if job.respawn_after_kill:
            job.respawn_after_kill = False
            self.spawn(job)
            return
        if job.keeps_alive_after(status):
            ran = time.monotonic() - job.started_at
            delay = max(0.0, job.throttle - ran)
            if delay > 0:
                self.log(
                    job.label,
                    f"Service only ran for {ran:.0f} seconds. Pushing respawn out by "
                    f"{delay:.0f} seconds.",
                )
            job.respawn_at = time.monotonic() + delay

    def tick(self) -> None:
        """Reap exits, fire exit timeouts, throttled respawns and ends of cleanup windows."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.process is not None:
                status = job.process.poll()
                if status is not None:
                    self.exited(job, status)
                elif job.kill_at is not None and now >= job.kill_at:
                    elapsed = f"Exit timeout elapsed ({job.exit_timeout} seconds). Killing"
                    self.log(job.label, elapsed)
                    job.kill_at = None
                    self.signal(job, signal.SIGKILL)
            if job.booting_out:
                if job.process is None and now >= job.remove_at:
                    self.log(job.label, "removed")
                    del self.jobs[job.label]
            elif job.respawn_at is not None and now >= job.respawn_at:
                self.spawn(job)

    def stop(self, job: Job) -> None:
        """SIGTERM now, SIGKILL after ExitTimeOut (0: never)."""
        self.signal(job, signal.SIGTERM)
        if job.exit_timeout > 0:
            job.kill_at = time.monotonic() + job.exit_timeout
        else:
            self.log(job.label, "This job has an infinite exit timeout")

    # -- launchctl subcommands ---------------------------------------------------------------

    def bootstrap(self, args: list[str]) -> str:
        if len(args) < 2 or args[0] != self.domain:
            raise Failure(5, "Bootstrap failed: 5: Input/output error")
        for path in args[1:]:
            try:
                plist = plistlib.loads(Path(path).read_bytes())
            except FileNotFoundError:
                raise Failure(2, "Bootstrap failed: 2: No such file or directory") from None
            except Exception:  # noqa: BLE001 - a malformed plist, as launchd sees it
                raise Failure(5, "Bootstrap failed: 5: Input/output error") from None
            label = plist.get("Label", "")
            existing = self.jobs.get(label)
            if existing is not None and existing.booting_out:
                self.log(label, "bootstrap refused: service is still being removed (37)")
                raise Failure(5, "Bootstrap failed: 5: Input/output error")
            if existing is not None:
                raise Failure(37, "Bootstrap failed: 37: Operation already in progress")
            if self.overrides().get(label, False):
                self.log(label, "bootstrap refused: service is disabled (119)")
                raise Failure(5, "Bootstrap failed: 5: Input/output error")
            job = Job(label, str(Path(path).absolute()), plist)
            self.jobs[label] = job
            keep = plist.get("KeepAlive", False)
            if plist.get("RunAtLoad", False) or (isinstance(keep, dict) and keep) or keep is True:
                self.spawn(job)
        return ""

    def bootout(self, args: list[str]) -> str:
        if len(args) != 1:
            raise Failure(5, "Boot-out failed: 5: Input/output error")
        try:
            job = self.service(args[0])
        except Failure:
            raise Failure(113, "Boot-out failed: 113: Could not find specified service") from None
        if job.booting_out:
            return ""
        job.booting_out = True
        job.respawn_at = None
        if job.process is None:
            job.remove_at = 0.0
        else:
            job.remove_at = time.monotonic() + self.cleanup
            self.log(job.label, "bootout initiated")
            self.stop(job)
            self.log(
                job.label,
                f"signaled service: Terminated: 15 ... scheduling cleanup in "
                f"{self.cleanup:g} sec after sending Terminated: 15",
            )
        return ""

    def kickstart(self, args: list[str]) -> str:
        options = "".join(a.lstrip("-") for a in args if a.startswith("-"))
        targets = [a for a in args if not a.startswith("-")]
        if len(targets) != 1 or set(options) - {"k"}:
            raise Failure(64, "Usage: launchctl kickstart [-k] <service-target>")
        job = self.service(targets[0])
        if job.booting_out:
            raise Failure(5, "Kickstart failed: 5: Input/output error")
        if job.process is None:
            self.spawn(job)
        elif "k" in options:  # kill the running instance (SIGKILL), then start a new one
            job.respawn_after_kill = True
            self.signal(job, signal.SIGKILL)
        return ""

    def kill(self, args: list[str]) -> str:
        if len(args) != 2:
            raise Failure(64, "Usage: launchctl kill <signal> <service-target>")
        name, target = args
        job = self.service(target)
        signum = int(name) if name.isdigit() else signal.Signals[f"SIG{name.removeprefix('SIG')}"]
        if job.process is None:
            raise Failure(3, "Could not kill service: 3: No such process")
        self.signal(job, signum)
        return ""

    def enable(self, args: list[str], disabled: bool) -> str:
        domain, _, label = (args[0] if args else "").rpartition("/")
        if domain != self.domain or not label:
            raise Failure(64, "Usage: launchctl enable|disable <service-target>")
        self.set_disabled(label, disabled)
        return ""

    def print_disabled(self, args: list[str]) -> str:
        if args != [self.domain]:
            raise Failure(64, "Usage: launchctl print-disabled <domain-target>")
        lines = [
            f'\t\t"{label}" => {"disabled" if off else "enabled"}'
            for label, off in self.overrides().items()
        ]
        return "disabled services = {\n" + "\n".join(lines) + "\n\t}\n"

    def print_service(self, args: list[str]) -> str:
        if len(args) != 1:
            raise Failure(64, "Usage: launchctl print <service-target>")
        job = self.service(args[0])
        plist = job.plist
        argv = plist.get("ProgramArguments") or [plist.get("Program", "")]
        env = plist.get("EnvironmentVariables", {})
        exit_line = "\tlast exit code = (never exited)"
        if job.last_exit is not None:
            what, value = describe_exit(job.last_exit)
            exit_line = f"\t{what} = {value}"
        lines = [
            f"{self.domain}/{job.label} = {{",
            "\tactive count = " + ("1" if job.process else "0"),
            f"\tpath = {job.path}",
            "\ttype = LaunchAgent",
            f"\tstate = {job.state}",
            "",
            f"\tprogram = {plist.get('Program', argv[0])}",
            "\targuments = {",
            *[f"\t\t{arg}" for arg in argv],
            "\t}",
            "",
            f"\tworking directory = {plist.get('WorkingDirectory', '/')}",
            "",
            f"\tstdout path = {plist.get('StandardOutPath', '/dev/null')}",
            f"\tstderr path = {plist.get('StandardErrorPath', '/dev/null')}",
            "\tenvironment = {",
            *[f"\t\t{key} => {value}" for key, value in env.items()],
            f"\t\tXPC_SERVICE_NAME => {job.label}",
            "\t}",
            "",
            f"\tdomain = {self.domain}",
            f"\tminimum runtime = {job.throttle}",
            f"\texit timeout = {job.exit_timeout}",
            f"\truns = {job.runs}",
        ]
        if job.process is not None:
            lines.append(f"\tpid = {job.process.pid}")
        lines += [exit_line, "}"]
        return "\n".join(lines) + "\n"

    def list_jobs(self, args: list[str]) -> str:
        if not args:
            rows = ["PID\tStatus\tLabel"]
            for job in self.jobs.values():
                pid = str(job.process.pid) if job.process else "-"
                rows.append(f"{pid}\t{job.last_exit or 0}\t{job.label}")
            return "\n".join(rows) + "\n"
        job = self.jobs.get(args[0])
        if job is None:
            raise Failure(113, f'Could not find service "{args[0]}" in domain for port')
        pid = f'\t"PID" = {job.process.pid};\n' if job.process else ""
        return (
            f'{{\n\t"Label" = "{job.label}";\n\t"LastExitStatus" = {job.last_exit or 0};\n'
            f'{pid}\t"OnDemand" = false;\n}};\n'
        )

    def handle(self, argv: list[str]) -> tuple[int, str, str]:
        """One launchctl invocation: (exit code, stdout, stderr)."""
        verb, args = (argv[0], argv[1:]) if argv else ("help", [])
        verbs = {
            "bootstrap": self.bootstrap,
            "bootout": self.bootout,
            "kickstart": self.kickstart,
            "kill": self.kill,
            "enable": lambda a: self.enable(a, disabled=False),
            "disable": lambda a: self.enable(a, disabled=True),
            "print": self.print_service,
            "print-disabled": self.print_disabled,
            "list": self.list_jobs,
        }
        if verb not in verbs:
            return 64, "", f"Unrecognized subcommand: {verb}\n"
        try:
            return 0, verbs[verb](args), ""
        except Failure as failure:
            text = failure.text
            if failure.code == 5 and verb == "bootstrap":
                text += "\nTry re-running the command as root for richer errors."
            return failure.code, "", text + "\n"

    def logout(self) -> None:
        """The session ends: every job gets SIGTERM, then SIGKILL after its ExitTimeOut."""
        for job in self.jobs.values():
            job.booting_out = True
            job.respawn_at = None
            self.stop(job)
        while any(job.process is not None for job in self.jobs.values()):
            self.tick()
            time.sleep(TICK)


def serve(launchd: Launchd, sock_path: Path) -> None:
    """Answer launchctl requests and run the jobs until SIGTERM (a logout)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path.unlink(missing_ok=True)
    server.bind(str(sock_path))
    server.listen(16)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    running = True

    def on_term(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while running:
        for _ in selector.select(timeout=TICK):
            try:
                connection, _ = server.accept()
            except BlockingIOError:
                continue
            with connection:
                connection.setblocking(True)
                request = b""
                while chunk := connection.recv(65536):
                    request += chunk
                code, out, err = launchd.handle(json.loads(request)["argv"])
                connection.sendall(json.dumps({"code": code, "out": out, "err": err}).encode())
        launchd.tick()
    launchd.logout()
    sock_path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="stand-in launchd (tests only)")
    parser.add_argument("--dir", type=Path, required=True, help="state folder (socket, log)")
    parser.add_argument(
        "--login-agents",
        type=Path,
        help="bootstrap every plist here that is not disabled, as a GUI login does",
    )
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    launchd = Launchd(args.dir)
    if args.login_agents is not None and args.login_agents.is_dir():
        for plist in sorted(args.login_agents.glob("*.plist")):
            launchd.handle(["bootstrap", launchd.domain, str(plist)])
    serve(launchd, args.dir / "launchd.sock")


if __name__ == "__main__":
    sys.exit(main())
