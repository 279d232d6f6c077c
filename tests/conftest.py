"""Shared test helpers: `need` for tests that read prepared data, and the `root` fixture."""
import os
import pathlib

import pytest

from vapt_min.data import data_root

PREPARE = "python data/prepare.py --from ../shared/data"


def need(path) -> pathlib.Path:
    """`path` if it exists. Otherwise skip locally, but fail in CI, where missing data is a set-up bug."""
    path = pathlib.Path(path)
    if not path.exists():
        message = f"{path} not found; run `{PREPARE}` (or set VAPT_MIN_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def root() -> pathlib.Path:
    return data_root()
