"""The README and docs/ are true: every configuration block parses and is accepted, every
command shown exists with the flags shown, every link between the pages resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlx_local.cli import build_parser
from tests import docs_snippets as snippets
from tests.helpers import REPO_ROOT, run_cli

CONFIG_BLOCKS = [b for b in snippets.all_blocks() if b.mark == "config"]
COMMANDS = sorted(
    {
        (command, block.where)
        for block in snippets.all_blocks()
        for command in snippets.shell_commands(block)
    }
    | {
        (command, str(page.relative_to(REPO_ROOT)))
        for page in snippets.PAGES
        for command in snippets.inline_commands(page)
    }
)
KNOWN_MARKS = {"config", "opencode", "codex", "claude-code", "example"}


def test_every_toml_and_json_block_says_what_it_is() -> None:
    """A configuration block nobody checks drifts: each one carries a snippet mark."""
    unmarked = [
        b.where
        for b in snippets.all_blocks()
        if b.language in ("toml", "json") and b.mark not in KNOWN_MARKS
    ]
    assert not unmarked, f"mark these blocks (<!-- snippet: KIND -->): {unmarked}"
    assert CONFIG_BLOCKS, "the docs show config.toml fragments"


@pytest.mark.parametrize("block", CONFIG_BLOCKS, ids=lambda b: b.where)
def test_a_config_fragment_passes_config_check(block: snippets.Block, tmp_path: Path) -> None:
    default = (REPO_ROOT / "service" / "config.default.toml").read_text()
    (tmp_path / "config.toml").write_text(snippets.merge_onto_default(default, block.text))
    result = run_cli(
        ["config", "check", "--no-probe"], tmp_path, env={"MLX_LOCAL_KEY": "a-key"}, timeout=60
    )
    assert result.returncode == 0, f"{block.where}: {result.stderr}"


@pytest.mark.parametrize(("command", "where"), COMMANDS)
def test_a_command_shown_exists_with_its_flags(command: str, where: str) -> None:
    argv = snippets.console_argv(command)
    if argv is None:
        _check_other_program(command, where)
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `{command}` is not a valid command (exit {exit_.code})")


def _check_other_program(command: str, where: str) -> None:
    """`python -m mlx_local.X` must name a module of the package."""
    module = re.search(r"-m (mlx_local(?:\.\w+)+)", command)
    if module:
        path = REPO_ROOT / "tools" / Path(*module[1].split("."))
        assert path.with_suffix(".py").is_file() or path.is_dir(), f"{where}: {command}"


def test_the_opencode_setup_is_the_served_address_and_id() -> None:
    (block,) = [b for b in snippets.all_blocks() if b.mark == "opencode"]
    setup = json.loads(block.text)
    provider = setup["provider"]["mlx-local"]
    assert provider["options"]["baseURL"] == "http://127.0.0.1:8000/v1"
    assert list(provider["models"]) == ["mlx-local"]
    assert setup["model"] == "mlx-local/mlx-local"


def test_every_link_between_pages_resolves() -> None:
    broken = []
    for page in snippets.PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (page.parent / file_part).resolve() if file_part else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_the_readme_is_a_front_door() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220
    assert "make run" in readme and "make test" in readme
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", readme))
    pages = {p.name for p in (REPO_ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"pages the README does not link: {pages - linked}"
