from __future__ import annotations

from typing import Iterator

import pytest

from tests.labeling.loopback import ChatServer


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer() as s:
        yield s
