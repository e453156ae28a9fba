"""Shared fixtures; the helpers they use live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_project, shrunk_params, write_dataset

# The longest modules (minutes each, measured with --durations) start first: xdist hands out whole
# files (`--dist loadfile`) in collection order, and a long file handed out last leaves one worker
# running it alone at the end (test_sweep's 6 minutes did: a 19.6 min run).
SLOWEST_FIRST = ["test_sweep.py", "test_lineage.py", "test_champion.py", "test_pipeline.py", "test_failures.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole, in order


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("tiny-fmnist")
    return directory, write_dataset(directory)


@pytest.fixture
def tiny_project(tmp_path, tiny_source) -> Path:
    source, sums = tiny_source
    return make_project(tmp_path / "project", shrunk_params(source), sums)
