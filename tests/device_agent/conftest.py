"""Images built once per session for the device agent tests."""

from __future__ import annotations

import pytest

from tests.device_agent.images import Images, build_images


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The digits net for stm32f746 and as a host library, signed (see images.py)."""
    return build_images(tmp_path_factory.mktemp("agent-images"))
