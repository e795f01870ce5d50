"""Progress goes to the log when stderr is not a terminal (NSML, nohup, CI)."""

import logging

from stages.common import logger, progress


def test_progress_logs_when_not_on_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="retrieval"):
        assert list(progress.progress(range(3), desc="things", unit="img")) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("things:")]
    assert [line.split(" (")[0] for line in lines] == ["things: 1 of 3 img", "things: 2 of 3 img", "things: 3 of 3 img"]
    assert "s left" in lines[0]
