"""report.html (`pipeline.report`): the HTML builder on a hand-made case, its pieces, the
pipeline's handling of a failing report, and the demo run's report in headless Chromium."""

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline import report
from pipeline.run import RunConfig, run
from stages.common.cache import FeatureStore
from stages.common.dataset import load_dataset
from stages.common.shortlist import save_ranking
from stages.rerank import verify
from tests.conftest import write_image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Page(HTMLParser):
    """The parts of a report page the tests check: query rows, candidate cards, image links."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[dict] = []  # {"query": name, "cards": [(data-correct, classes)]}
        self.images: list[str] = []
        self.svgs = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "query-row" in classes:
            self.rows.append({"query": a["data-query"], "cards": []})
        elif tag == "figure" and "candidate" in classes:
            self.rows[-1]["cards"].append((a["data-correct"], classes))
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "svg":
            self.svgs += 1


def _rgb(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def tiny(tmp_path):
    """Three queries, four references (r_bad unreadable), a hand-made ground truth, a global
    ranking, and a rerank store in which q1's entry predates kept matches."""
    images = {f"q{i}": write_image(tmp_path / "img" / f"q{i}.png", _rgb(i)) for i in (1, 2, 3)}
    images |= {r: write_image(tmp_path / "img" / f"{r}.png", _rgb(10 + i, 60 + 10 * i)) for i, r in
               enumerate(["r1", "r2", "r3"])}
    images["r_bad"] = tmp_path / "img" / "r_bad.jpg"
    images["r_bad"].write_bytes(b"not an image")
    refs = ["r1", "r2", "r3", "r_bad"]
    truth = {"q1": {"r1"}, "q2": {"r2", "r3"}, "q3": {"r3"}}
    final = {"q1": ["r2", "r1", "r3", "r_bad"],  # AP 0.5
             "q2": ["r2", "r3", "r1", "r_bad"],  # AP 1
             "q3": ["r1", "r_bad", "r2", "r3"]}  # AP 0.25
    order = np.array([[refs.index(r) for r in final[q]] for q in final], np.int32)
    scores = np.tile(np.float32([0.9, 0.8, 0.7, 0.6]), (3, 1))
    ranking = save_ranking(tmp_path / "global_ranking.npz", list(final), refs, order, scores)
    store = FeatureStore(tmp_path / "cache", "rerank", {"name": "synthetic"}, "k")
    xy = np.float32([[10, 10], [50, 20], [100, 80]])
    store.write("q3", verify.entry_arrays({"r1": (3, (xy, xy * 0.5)), "r_bad": (0, verify.NO_MATCHES)},
                                          {"r1": "s", "r_bad": "s"}))
    old = verify.entry_arrays({"r2": (40, None), "r1": (5, None)}, {"r2": "s", "r1": "s"})
    store.write("q1", {k: old[k] for k in ("ref_names", "inliers", "ref_stamps")})  # no match arrays
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("q1\tr2\nq1\tr1\nq3\tr1\nq3\tr_bad\n")
    return {"images": images, "truth": truth, "final": final, "ranking": ranking, "store": store.dir,
            "pairs": pairs, "out": tmp_path / "out"}


def test_builder_on_a_hand_made_case(tiny):
    data = report.collect({"global": tiny["final"], "rerank": tiny["final"]}, tiny["images"], 2, title="tiny",
                          ground_truth=tiny["truth"], metrics={"rerank": {"mAP": 0.58, "n_queries": 3}},
                          ranking_path=tiny["ranking"], pairs_paths=[tiny["pairs"]], inliers_dir=tiny["store"])
    path = report.build_report(tiny["out"], data)
    assert path == tiny["out"] / "report.html"
    text = path.read_text()
    page = Page(text)
    # the two worst by AP, worst first
    assert [r["query"] for r in page.rows] == ["q3", "q1"]
    for row in page.rows:
        q = row["query"]
        expected = ["1" if r in tiny["truth"][q] else "0" for r in tiny["final"][q]]
        assert [flag for flag, _ in row["cards"]] == expected
        assert all(("correct" in cls) == (flag == "1") and ("incorrect" in cls) == (flag == "0")
                   for flag, cls in row["cards"])
    # every link relative, inside report_files/, on disk; r_bad has none (a placeholder instead)
    assert page.images and all(not Path(src).is_absolute() and src.startswith("report_files/")
                               and (tiny["out"] / src).is_file() for src in page.images)
    n_thumbs = len({"q3", "q1", "r1", "r2", "r3"})
    match_pictures = [s for s in page.images if Path(s).name.startswith("m-")]
    assert len(match_pictures) == 1  # q3-r1: 3 kept inliers; q3-r_bad: 0; q1's pairs: not kept
    assert len(page.images) == 2 * (1 + 4) - 2 + len(match_pictures)  # per row the query and 4 cards, no r_bad
    assert len(set(page.images) - set(match_pictures)) == n_thumbs
    assert sorted(p.name for p in (tiny["out"] / "report_files").iterdir()) == sorted(
        Path(s).name for s in set(page.images))
    assert "2 verified pairs shown have no inlier matches to draw" in text
    assert "matches not kept in the cache entry" in text and "unreadable" in text
    assert page.svgs == 2  # inliers and probability histograms (ground truth and verification)
    assert "inliers 40" in text and "not verified" in text and "AP 0.250" in text

    # a second report without verification and ground truth: a sample, stale pictures removed
    data = report.collect({"global": tiny["final"]}, tiny["images"], 5)
    page = Page(report.build_report(tiny["out"], data).read_text())
    assert [r["query"] for r in page.rows] == ["q1", "q2", "q3"]
    assert all(flag == "" for r in page.rows for flag, _ in r["cards"]) and page.svgs == 0
    assert not any(p.name.startswith("m-") for p in (tiny["out"] / "report_files").iterdir())


def test_select_queries():
    final = {"a": ["x", "y"], "b": ["y", "x"], "c": ["x", "y"], "d": ["y", "x"]}
    truth = {"a": {"y"}, "b": {"y"}, "c": {"y"}}  # d has no ground truth: never "worst"
    assert report.select_queries(final, truth, 2) == ["a", "c"]  # AP 0.5 each, ties by name
    assert report.select_queries(final, truth, 10) == ["a", "c", "b"]
    sample = report.select_queries(final, None, 2)
    assert len(sample) == 2 and sample == sorted(sample) == report.select_queries(final, None, 2)
    assert report.select_queries(final, None, 9) == ["a", "b", "c", "d"]
    assert report.select_queries(final, truth, 0) == []


def test_draw_matches_draws_lines_between_the_points():
    left, right = np.full((40, 30, 3), 255, np.uint8), np.full((20, 50, 3), 255, np.uint8)
    out = report.draw_matches(left, right, [[5, 10]], [[25, 10]], gap=10)
    assert out.shape == (40, 30 + 10 + 50, 3) and out.dtype == np.uint8
    row = out[10, 5:65].min(axis=1)
    assert (row < 200).all()  # a line from (5, 10) to (30 + 10 + 25, 10)
    assert (out[30:, 5] == 255).all()
    blank = report.draw_matches(left, right, np.zeros((0, 2)), np.zeros((0, 2)))
    assert (blank[:40, :30] == left).all() and (blank[20:, 38:] == 255).all()
    many = report.draw_matches(left, right, np.full((500, 2), 3.0), np.full((500, 2), 3.0), max_lines=2)
    assert many.shape == blank.shape
    with pytest.raises(ValueError):
        report.draw_matches(left, right, np.zeros((2, 2)), np.zeros((3, 2)))


def test_histogram_counts_true_and_false_pairs():
    h = report.histogram("p", [0.05, 0.15, 0.95, 1.0, 0.5], [True, False, True, True, False], report.PROBABILITY_BINS)
    assert h.true_counts.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert h.false_counts.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    svg = report.histogram_svg(h)
    assert svg.startswith("<svg") and svg.count("<rect") == 2 * 10 + 2 and "2 true pairs" in svg


def test_a_failing_report_keeps_the_rankings(demo_data, weights_cache, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.html").write_text("an earlier run's report")

    def fail(*_args, **_kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "build_report", fail)
    rc = RunConfig(stages=("global",), cache=weights_cache, top_k=5, report=3)
    result = run(load_dataset(demo_data), out, rc)
    assert result["report"] is None and not (out / "report.html").exists()
    assert "report.html not written (RuntimeError: disk full)" in caplog.text
    assert json.loads((out / "rankings.json").read_text()) == result["rankings"]
    assert (out / "metrics.json").exists()


@pytest.fixture(scope="module")
def demo_report(demo_data, weights_cache, tmp_path_factory):
    """`run_pipeline.py` on the demo with its defaults (the report on: the demo has ground truth)."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("demo-report")
    assert main(["--cache", str(weights_cache), "--output", str(out)]) == 0
    return load_dataset(demo_data), out


def test_the_demo_report_marks_the_ground_truth(demo_report):
    dataset, out = demo_report
    page = Page((out / "report.html").read_text())
    rankings = json.loads((out / "rankings.json").read_text())
    assert len(page.rows) == min(report.DEFAULT_QUERIES, len(dataset.ground_truth))
    for row in page.rows:
        q = row["query"]
        assert [f for f, _ in row["cards"]] == ["1" if r in dataset.ground_truth[q] else "0"
                                                for r in rankings[q][:report.TOP]]
    assert page.svgs == 2 and all((out / src).is_file() for src in page.images)
    assert any(Path(s).name.startswith("m-") for s in page.images)  # match pictures from the kept inliers


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_the_demo_report_renders_in_chromium(demo_report):
    binary = _chromium()
    if binary is None:
        reason = "no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("REPORT_BROWSER_REQUIRED"):
            pytest.fail(reason + " and REPORT_BROWSER_REQUIRED is set")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    dataset, out = demo_report
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            page.goto((out / "report.html").as_uri(), wait_until="load")
            rows = page.locator(".query-row").count()
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, "
                                   "i.naturalWidth])")
        finally:
            browser.close()
    assert rows == min(report.DEFAULT_QUERIES, len(dataset.ground_truth))
    assert len(images) > rows  # a query and its references per row, and match pictures
    assert [src for src, complete, width in images if not complete or width == 0] == []
    assert errors == []
