import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Collect(logging.Handler):
    """Keeps the messages of the log records it is handed (attach it to the package logger)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextmanager
def collected_logs():
    """`with collected_logs() as lines:` the package logger's INFO and higher messages,
    appended to `lines` while the block runs (`cli.main` finds a handler and installs none)."""
    from stages.common import logger

    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def log_lines():
    """The package logger's messages during the test."""
    with collected_logs() as lines:
        yield lines


@pytest.fixture(scope="session")
def weights_cache(tmp_path_factory):
    """A cache folder shared by the session's tests, so the weight conversion runs once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def demo_data(weights_cache):
    from pipeline.demo import build_demo

    return build_demo(weights_cache / "demo")


def write_image(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())
    return path
