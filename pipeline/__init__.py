"""Product image retrieval pipeline: global ranking, DELF local features, RANSAC reranking."""

import logging

logger = logging.getLogger("retrieval")


def setup_logging(level: int = logging.INFO) -> None:
    """Sends the package logger to stderr with timestamps, once."""
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
