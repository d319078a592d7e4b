"""Commands for the patched checkout and its patch queue: setup-repo, patches."""

from __future__ import annotations

import argparse

from rich.table import Table

from .. import project
from ..console import console
from ..locking import project_lock
from . import checkout, install, lint, patchqueue, queue, setup, update
from .update_state import UpdateReport
from .upstream import SOURCES

OUTCOME_STYLE = {
    "clean": "green",
    "three-way": "yellow",
    "resolved": "yellow",
    "empty": "cyan",
    "absorbed": "cyan",
    "conflict": "red",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add `setup-repo` and `patches` to the parser."""
    setup = sub.add_parser(
        "setup-repo",
        help="clone upstream mlx-lm at the pinned release, apply the patch queue, install it",
        description="Create or reuse mlx-lm-repo/ at a release with the patch queue applied, "
        "install it editable into this venv and verify the server's options.",
    )
    setup.add_argument("--ref", help="release tag to build on (default: the pin in upstream.toml)")
    setup.add_argument(
        "--source", choices=SOURCES, default="auto", help="where upstream comes from"
    )
    setup.add_argument("--upstream", metavar="URL", help="git URL or path instead of upstream's")
    setup.add_argument("--no-install", action="store_true", help="do not pip install the checkout")
    setup.add_argument(
        "--backend",
        choices=install.BACKENDS,
        default="auto",
        help="mlx build to install (auto: metal on Apple silicon, cpu elsewhere)",
    )
    setup.set_defaults(handler=run_setup_repo)

    upd = sub.add_parser(
        "update-upstream",
        help="move the patch queue onto a newer mlx-lm release",
        description="Rebase the patch queue onto a newer release in mlx-lm-repo-update/, "
        "guard what upstream absorbed, refresh patches/, move the pin, reinstall, verify.",
    )
    upd.add_argument("--to", metavar="TAG", help="release to move to (default: the newest)")
    upd.add_argument(
        "--dry-run", action="store_true", help="report what would happen, change nothing"
    )
    upd.add_argument("--pre", action="store_true", help="consider pre-releases for the newest")
    upd.add_argument(
        "--source",
        choices=SOURCES,
        help="where upstream comes from (default: as recorded by setup-repo, else auto)",
    )
    upd.add_argument(
        "--upstream",
        metavar="URL",
        help="git URL or path instead of upstream's (default: as recorded by setup-repo)",
    )
    upd.add_argument("--no-install", action="store_true", help="do not reinstall the checkout")
    modes = upd.add_mutually_exclusive_group()
    modes.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="go on after fixing a conflict in mlx-lm-repo-update/",
    )
    modes.add_argument("--abort", action="store_true", help="undo the update in progress")
    upd.set_defaults(handler=run_update_upstream)

    patches = sub.add_parser("patches", help="inspect and edit the patch queue")
    actions = patches.add_subparsers(dest="patches_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="each patch, its guard, what it provides, its state")
    listing.set_defaults(handler=run_patches_list)
    new = actions.add_parser(
        "new", help="turn new commits (and uncommitted changes) in mlx-lm-repo/ into patch files"
    )
    new.add_argument("name", help="file name part of the new patch, e.g. server-my-option")
    new.add_argument("-m", "--message", help="commit subject for uncommitted changes")
    new.add_argument(
        "--provides",
        action="append",
        default=[],
        metavar="OPTION",
        help="server option the patch adds (repeatable; written as a Provides: trailer)",
    )
    new.set_defaults(handler=run_patches_new)
    actions.add_parser(
        "export", help="rewrite patches/ from mlx-lm-repo/'s branch (refresh)"
    ).set_defaults(handler=run_patches_export)
    actions.add_parser(
        "lint", help="ruff, under upstream's rules, on the files the queue adds or changes"
    ).set_defaults(handler=run_patches_lint)


def run_setup_repo(args: argparse.Namespace) -> int:
    """setup-repo: build, install and verify the patched checkout."""
    proj = project.current()
    with project_lock(proj.state_dir, "setup-repo"):
        report = setup.setup(
            proj,
            ref=args.ref,
            source=args.source,
            upstream_url=args.upstream,
            install=not args.no_install,
            backend=args.backend,
        )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    table = Table(title=f"mlx-lm {report.base} + patch queue ({report.source})")
    table.add_column("patch")
    table.add_column("result")
    rows = {o.name: f"[{OUTCOME_STYLE.get(o.result, '')}]{o.result}[/]" for o in report.applied}
    for name, provides in report.absorbed.items():
        rows[name] = f"[cyan]absorbed[/] (upstream provides {' '.join(provides)})"
    for name in report.skipped:
        rows[name] = "[dim]not for this base (guard)[/]"
    for entry in patchqueue.Series.load(proj.series_file).entries:  # in the queue's order
        if entry.name in rows:
            table.add_row(entry.name, rows[entry.name])
    console.print(table)
    if report.branch_changed:
        console.print(f"mlx-lm-repo/ is on branch {checkout.BRANCH} at {report.head[:12]}")
        if report.backup_ref:
            console.print(f"previous branch kept as {report.backup_ref}")
    else:
        console.print("mlx-lm-repo/ already up to date: nothing changed")
    if report.installed:
        console.print("installed mlx-lm-repo/ editable into this environment")
    if report.provides:
        console.print(f"server provides: {' '.join(report.provides)}")
    return 0


def run_patches_list(args: argparse.Namespace) -> int:
    """patches list: the series with each patch's state at the checkout's base."""
    base, statuses = queue.queue_status(project.current())
    table = Table(title=f"patch queue at {base or 'no checkout (run setup-repo)'}")
    for column in ("patch", "guard", "provides", "state"):
        table.add_column(column)
    for status in statuses:
        table.add_row(status.name, status.guard, " ".join(status.provides), status.state)
    console.print(table)
    return 0


def run_patches_new(args: argparse.Namespace) -> int:
    """patches new: new commits in the checkout become patch files."""
    proj = project.current()
    with project_lock(proj.state_dir, "patches new"):
        report = queue.new_patch(proj, args.name, args.message, args.provides)
    _print_export(report)
    return 0


def run_patches_export(args: argparse.Namespace) -> int:
    """patches export: refresh patches/ from the checkout's branch."""
    proj = project.current()
    with project_lock(proj.state_dir, "patches export"):
        report = queue.export(proj)
    _print_export(report)
    return 0


def run_patches_lint(args: argparse.Namespace) -> int:
    """patches lint: the queue's Python files pass upstream's ruff rules and formatting."""
    report = lint.lint_queue(project.current())
    if report.problems:
        console.print(report.problems, markup=False, highlight=False)
        console.print(f"[red]patches lint:[/] problems in the queue's {len(report.files)} files")
        return 1
    console.print(f"patches lint: {len(report.files)} files clean ({' '.join(report.files)})")
    return 0


def _print_export(report: patchqueue.ExportReport) -> None:
    for name in report.written:
        console.print(f"wrote    patches/{name}")
    for name in report.removed:
        console.print(f"removed  patches/{name}")
    if not report.written and not report.removed:
        console.print(f"patches/ already matches the branch ({len(report.unchanged)} unchanged)")


def run_update_upstream(args: argparse.Namespace) -> int:
    """update-upstream: start, continue or abort an update of the queue's base."""
    proj = project.current()
    with project_lock(proj.state_dir, "update-upstream"):
        if args.abort:
            state = update.abort_update(proj)
            console.print(
                f"update to {state.new_base} aborted: mlx-lm-repo/ and patches/ are back at "
                f"{state.old_base}"
            )
            return 0
        if args.resume:
            report = update.continue_update(proj)
        else:
            report = update.start(
                proj,
                to=args.to,
                dry_run=args.dry_run,
                include_pre=args.pre,
                source=args.source,
                upstream_url=args.upstream,
                install=not args.no_install,
            )
    _print_update(report)
    return 1 if report.status == "conflict" else 0


def _print_update(report: UpdateReport) -> None:
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if report.status == "up-to-date":
        console.print(f"already on the newest release {report.new_base}: nothing to do")
        return
    title = f"{report.old_base} → {report.new_base}"
    if report.status == "dry-run":
        title += " (dry run: nothing changed)"
    table = Table(title=title)
    for column in ("patch", "outcome", "detail"):
        table.add_column(column)
    for result in report.results:
        style = OUTCOME_STYLE.get(result.outcome, "dim")
        detail = result.detail or ", ".join(result.files)
        table.add_row(result.name, f"[{style}]{result.outcome}[/]", detail)
    console.print(table)
    if report.conflict_hunks:
        console.print(report.conflict_hunks, markup=False, highlight=False)
    if report.status == "conflict":
        conflict = report.results[-1]
        console.print(
            f"[red]conflict:[/] {conflict.name} does not apply on {report.new_base} "
            f"({', '.join(conflict.files)}).\n"
            f"Fix the files in {report.worktree}, `git add` them, then run "
            "`update-upstream --continue`; or `update-upstream --abort` to go back.\n"
            "mlx-lm-repo/, patches/ and the installed server are unchanged until then.",
            highlight=False,
        )
    if report.status == "updated":
        if report.server_changes:
            console.print("upstream changes to mlx_lm/server.py:", report.server_changes)
        if report.range_diff:
            console.print("patches before → after (git range-diff):")
            for line in report.range_diff:
                console.print(f"  {line}", markup=False, highlight=False)
        console.print(
            f"mlx-lm-repo/ is on {report.new_base}; patches/ refreshed and the pin moved. "
            f"Previous branch kept as {report.backup_ref}."
        )
