"""An update's saved state and its report: what --continue and --abort resume from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from ..project import Project

STATE_FILE = "update.json"


@dataclass
class PatchResult:
    """One patch's outcome in an update."""

    name: str
    outcome: str  # clean / three-way / absorbed / conflict / not for this base
    detail: str = ""
    files: list[str] = field(default_factory=list)
    since: str = ""  # for absorbed patches: the first release that has them


@dataclass
class UpdateState:
    """Everything needed to continue or abort an update; saved after every step."""

    old_base: str
    new_base: str
    old_head: str
    backup_ref: str
    worktree: str
    todo: list[str]
    releases: list[list[str]] = field(default_factory=list)  # [tag, commit] in (old, new]
    fetched_tag: bool = False
    install: bool = True
    results: list[PatchResult] = field(default_factory=list)
    stage: str = "applying"  # applying / finishing

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> UpdateState | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["results"] = [PatchResult(**r) for r in data["results"]]
        return cls(**data)


@dataclass
class UpdateReport:
    """What update-upstream did or would do."""

    old_base: str
    new_base: str
    results: list[PatchResult]
    status: str  # updated / up-to-date / conflict / dry-run
    source: str = ""
    notes: list[str] = field(default_factory=list)
    range_diff: list[str] = field(default_factory=list)
    server_changes: str = ""
    conflict_hunks: str = ""
    worktree: str = ""
    backup_ref: str = ""


def update_worktree(project: Project) -> Path:
    """Where an update's rebase happens: beside mlx-lm-repo/, so the checkout stays usable."""
    return project.root / "mlx-lm-repo-update"


def state_path(project: Project) -> Path:
    return project.state_dir / STATE_FILE


def snapshot_dir(project: Project) -> Path:
    """A copy of patches/ taken when the update started, restored by --abort."""
    return project.state_dir / "update-patches-backup"
