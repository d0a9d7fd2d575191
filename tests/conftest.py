"""Shared fixtures: a fake NBIA v4 server on 127.0.0.1 (see tests/fake_nbia.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # make `import fake_nbia` work anywhere

from fake_nbia import FakeNbia  # noqa: E402

# Tests talk only to servers they start: no run (in this process, in a subprocess or in a
# slurm job, which inherit the environment) asks doi.org for BibTeX unless a test points
# --doi-resolver at its own server.
os.environ["TCIA_DOI_RESOLVER"] = "none"


@pytest.fixture
def fake_nbia_factory() -> Iterator[Callable[..., FakeNbia]]:
    """``fake = fake_nbia_factory(**FakeConfig overrides)``: a started server, stopped at teardown."""
    started: list[FakeNbia] = []

    def make(**overrides: Any) -> FakeNbia:
        fake = FakeNbia(**overrides).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def fake_nbia(fake_nbia_factory: Callable[..., FakeNbia]) -> FakeNbia:
    """A started FakeNbia with the default configuration."""
    return fake_nbia_factory()
