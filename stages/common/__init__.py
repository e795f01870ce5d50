"""Product image retrieval pipeline: global ranking, DELF local features, RANSAC reranking."""

import logging

logger = logging.getLogger("retrieval")


def setup_logging(level: int = logging.INFO) -> None:
    """Sends the package logger to stderr with timestamps, once, and keeps OpenCV's own
    warnings about bad image files quiet (the pipeline logs one line per such file)."""
    if logger.handlers:
        return
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
