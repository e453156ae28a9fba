"""Shared fixtures; the helpers they use live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_project, shrunk_params, write_dataset


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("tiny-fmnist")
    return directory, write_dataset(directory)


@pytest.fixture
def tiny_project(tmp_path, tiny_source) -> Path:
    source, sums = tiny_source
    return make_project(tmp_path / "project", shrunk_params(source), sums)
