"""A [distributed] group of two ranks (tensor parallel, mlx.launch's ring backend on
127.0.0.1) says what one rank says: the scripted demo model's greedy answers, by content."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.distributed_helpers import GroupProject
from tests.service.test_demo_answers import answers, scripted_answers
from tests.service.test_distributed import group, sshd  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_two_ranks_give_the_answers_of_one(group: GroupProject, demo_model: Path) -> None:  # noqa: F811
    group.write_config(demo_model, 'hosts = ["127.0.0.1", "127.0.0.1"]')
    started = group.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        assert answers(f"http://127.0.0.1:{group.port}", "mlx-local") == scripted_answers()
    finally:
        group.cli("stop")
