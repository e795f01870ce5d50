"""A visual report of a run: ``report.html`` in the output folder.

Users debug retrieval by looking. The report shows the run's per-stage metrics; with
ground truth, how the verification scores of the true and the false pairs are distributed
(inline SVG histograms); and, for the queries shown (the N worst by final AP with ground
truth, a seeded sample of N without), the query image and its top-10 final references with
their global score, inlier count and calibrated same-product probability, the correct ones
marked, and for each verified pair a side-by-side picture with the inlier matches drawn as
lines. The matches are the ones `stages.rerank.verify` kept in its store: nothing is matched
again (a pair cached before matches were kept is listed without a picture, and says so).

Images are small JPEG thumbnails in ``report_files/`` next to the HTML, linked relatively,
so the folder can be zipped and opened anywhere. Every file is written to a temp file and
renamed. HTML from the standard library, pictures with OpenCV: no extra dependency.
"""

import hashlib
import html
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from stages.common import logger
from stages.common.cache import FeatureStore, atomic_write_bytes
from stages.common.images import ImageReadError, read_image, resize_by, resize_max_side
from stages.common.shortlist import RankingFile, read_pairs
from stages.rerank import calibrate
from stages.rerank.inliers import load_inliers, load_matches

from .analysis import INLIER_BINS, same_product, verified_pairs
from .evaluate import average_precision, relevant_ranks

REPORT_FILE = "report.html"
ASSETS_DIR = "report_files"
DEFAULT_QUERIES = 20  # queries shown by default (runs with ground truth)
TOP = 10  # references shown per query
THUMB_SIDE = 160  # longer side of the query / reference thumbnails, pixels
MATCH_HEIGHT = 200  # height of each image in a match picture, pixels
MATCH_MAX_WIDTH = 400  # widest either image of a match picture may be, pixels
MAX_LINES = 150  # inlier matches drawn per picture (an even sample beyond)
JPEG_QUALITY = 85
PROBABILITY_BINS = np.linspace(0.0, 1.0, 11)


@dataclass
class Candidate:
    """One reference of a query's final top list.

    Attributes:
        reference: its name.
        rank: 1-based rank in the final ranking.
        global_score: stage-1 similarity (cosine of the global descriptors); None if unknown.
        inliers: RANSAC inlier count; None when the pair was not verified.
        probability: calibrated same-product probability (`stages.rerank.calibrate`); None
            when the pair was not verified.
        correct: whether the ground truth lists it for the query; None without ground truth.
        matches: the inlier matches, (query points float32 [n, 2], reference points
            float32 [n, 2]), (x, y) in original-image pixels; None when not kept (or not
            verified).
    """

    reference: str
    rank: int
    global_score: float | None = None
    inliers: int | None = None
    probability: float | None = None
    correct: bool | None = None
    matches: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class QueryRow:
    """One query of the report.

    Attributes:
        query: its name.
        candidates: its top final references, best first.
        ap: final average precision; None without ground truth.
        global_ap: stage-1 average precision; None without ground truth.
        n_relevant: references the ground truth lists for it; None without ground truth.
        first_correct: 1-based final rank of its first correct reference; None if none
            (or no ground truth).
    """

    query: str
    candidates: list[Candidate]
    ap: float | None = None
    global_ap: float | None = None
    n_relevant: int | None = None
    first_correct: int | None = None


@dataclass
class Histogram:
    """Counts of the true and the false verified pairs in the bins of one score.

    Attributes:
        title: what is counted, e.g. "inliers".
        labels: [B] bin labels.
        true_counts: int [B] true pairs per bin.
        false_counts: int [B] false pairs per bin.
    """

    title: str
    labels: list[str]
    true_counts: np.ndarray
    false_counts: np.ndarray


@dataclass
class ReportData:
    """Everything `build_report` draws, gathered from a run by `collect`.

    Attributes:
        title: the page title (the data folder).
        rows: the queries shown.
        images: {image name: path} of the queries and references.
        metrics: {stage: {metric: value}} (`pipeline.evaluate.evaluate`); {} without
            ground truth.
        timings: {stage: seconds}.
        summary: lines about the run (sizes, confs, verification).
        histograms: verification score histograms (true vs false pairs); [] without ground
            truth or verification.
        notes: caveats to show at the top (e.g. pairs whose matches were not kept).
    """

    title: str
    rows: list[QueryRow]
    images: dict[str, Path]
    metrics: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def select_queries(final: dict[str, list[str]], ground_truth: dict[str, set[str]] | None, n: int,
                   seed: int = 0, aps: dict[str, float] | None = None) -> list[str]:
    """The queries a report shows.

    Args:
        final: the final rankings, {query: [references, best first]}.
        ground_truth: {query: relevant references} or None.
        n: how many (>= 0).
        seed: the sample's seed (without ground truth).
        aps: {query: final AP} of the queries with ground truth, when the caller has them
            (`pipeline.outputs.write_streamed`; computed from `final` otherwise).

    Returns:
        With ground truth: the `n` queries with ground truth of lowest final AP, worst first
        (ties by name). Without: a seeded sample of `n` queries, in name order.
    """
    if ground_truth is not None:
        if aps is None:
            aps = {q: average_precision(relevant_ranks(refs, ground_truth[q]), len(ground_truth[q]))
                   for q, refs in final.items() if ground_truth.get(q)}
        return sorted(aps, key=lambda q: (aps[q], q))[:n]
    names = sorted(final)
    if n >= len(names):
        return names
    picked = np.random.default_rng(seed).choice(len(names), size=n, replace=False)
    return [names[i] for i in sorted(picked)]


def histogram(title: str, values, same, edges, labels=None) -> Histogram:
    """Bins `values` of the true (`same`) and the false pairs.

    Args:
        title: what the values are.
        values: float [P] one score per pair.
        same: bool [P] true pair or not.
        edges: [B + 1] increasing bin edges (the last bin includes its right edge).
        labels: [B] bin labels; default "lo-hi" from the edges.

    Returns:
        The `Histogram`.
    """
    values, same = np.asarray(values, np.float64), np.asarray(same, bool)
    edges = np.asarray(edges, np.float64)
    labels = labels or [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(len(edges) - 1)]
    true_counts, _ = np.histogram(values[same], bins=edges)
    false_counts, _ = np.histogram(values[~same], bins=edges)
    return Histogram(title, list(labels), true_counts.astype(np.int64), false_counts.astype(np.int64))


def _inlier_labels() -> list[str]:
    e = INLIER_BINS
    return [(f"{e[i]}" if e[i + 1] - e[i] == 1 else f"{e[i]}-{e[i + 1] - 1}") if i + 2 < len(e) else f"{e[i]}+"
            for i in range(len(e) - 1)]


def verification_histograms(table: dict, same: np.ndarray) -> list[Histogram]:
    """The inlier and the probability histograms of a `pipeline.analysis.verified_pairs`
    table, `same` bool [P] marking its true pairs."""
    return [histogram("inliers", table["inliers"], same, INLIER_BINS, _inlier_labels()),
            histogram("same-product probability", table["probability"], same, PROBABILITY_BINS)]


def collect(rankings_by_stage: dict[str, dict[str, list[str]]], images: dict[str, Path], n_queries: int, *,
            title: str = "", ground_truth: dict[str, set[str]] | None = None, metrics: dict | None = None,
            timings: dict | None = None, summary=(), ranking_path: Path | None = None, pairs_paths=(),
            inliers_dir: Path | None = None, calibration_path: Path | None = None,
            pairs_table: dict | None = None, aps: dict[str, float] | None = None) -> ReportData:
    """Gathers what a report shows from a run's outputs.

    Args:
        rankings_by_stage: {stage: {query: [references, best first]}}, "global" first, the
            final stage last.
        images: {image name: path} of the queries and references.
        n_queries: how many queries to show (`select_queries`).
        title: the page title.
        ground_truth: {query: relevant references} or None.
        metrics: {stage: metrics} or None.
        timings: {stage: seconds} or None.
        summary: lines about the run.
        ranking_path: ``global_ranking.npz`` (global scores); None leaves them out (needed
            with `inliers_dir` and ground truth, for the histograms).
        pairs_paths: the verified shortlist files; () without verification.
        inliers_dir: the inlier cache folder (`stages.rerank.verify.main`); None without
            verification.
        calibration_path: ``calibration.json`` or None (`calibrate.DEFAULT`).
        pairs_table: the run's `pipeline.analysis.verified_pairs` table when the caller has
            it (read from the inlier cache otherwise).
        aps: {query: final AP} when the caller has them (`select_queries`).

    Returns:
        The `ReportData`.
    """
    final = rankings_by_stage[list(rankings_by_stage)[-1]]
    first = rankings_by_stage.get("global", final)
    shown = select_queries(final, ground_truth, n_queries, aps=aps)
    calibration = calibrate.read(calibration_path)
    scores: dict[str, dict[str, float]] = {}
    if ranking_path is not None:
        ranking = RankingFile(ranking_path)
        ref_names = ranking.ref_names.tolist()
        row = {q: i for i, q in enumerate(ranking.query_names.tolist())}
        for q in shown:
            if q in row:
                order, ranked = ranking.full([row[q]])
                scores[q] = {ref_names[j]: float(s) for j, s in zip(order[0], ranked[0], strict=True)}
    verified = inliers_dir is not None
    counts: dict[str, dict[str, int]] = {q: {} for q in shown}
    matches: dict[str, dict] = {}
    histograms, notes = [], []
    if verified:
        store = FeatureStore.open(Path(inliers_dir))
        wanted = set(shown)
        for path in pairs_paths:
            pairs = {q: refs for q, refs in read_pairs(path).items() if q in wanted}
            for q, c in load_inliers(store, pairs).items():
                counts[q].update(c)
        matches = {q: load_matches(store, q) for q in shown}
        if ground_truth is not None:
            table = pairs_table or verified_pairs(ranking_path, pairs_paths, inliers_dir, calibration)
            histograms = verification_histograms(table, same_product(table, ground_truth))
    rows, not_kept = [], 0
    for q in shown:
        relevant = ground_truth.get(q, set()) if ground_truth is not None else None
        candidates = []
        for rank, ref in enumerate(final[q][:TOP], 1):
            n = counts[q].get(ref)
            score = scores.get(q, {}).get(ref)
            p = None
            if n is not None:
                p = float(calibrate.probability(calibration, np.array([score or 0.0]), np.array([n]))[0])
            kept = matches.get(q, {}).get(ref)
            not_kept += n is not None and n > 0 and kept is None
            candidates.append(Candidate(ref, rank, score, n, p, None if relevant is None else ref in relevant, kept))
        row = QueryRow(q, candidates)
        if relevant:
            ranks = relevant_ranks(final[q], relevant)
            row.ap = average_precision(ranks, len(relevant))
            row.global_ap = average_precision(relevant_ranks(first[q], relevant), len(relevant))
            row.n_relevant, row.first_correct = len(relevant), int(ranks.min()) if len(ranks) else None
        rows.append(row)
    if not verified:
        notes.append("no verification in this run: no inliers, probabilities or match pictures")
    elif ground_truth is None:
        notes.append("no ground truth: no correct marks and no histograms; the queries shown are a sample")
    if not_kept:
        notes.append(f"{not_kept} verified pairs shown have no inlier matches to draw: their cache entries were "
                     "written before the matches were kept (rerun with --overwrite to draw them)")
    return ReportData(title, rows, images, metrics or {}, timings or {}, list(summary), histograms, notes)


# --- pictures -------------------------------------------------------------------------------

def fit_size(width: int, height: int, target_height: int, max_width: int) -> float:
    """The scale that gives an image `target_height` rows, or `max_width` columns if that
    would make it wider."""
    return min(target_height / max(height, 1), max_width / max(width, 1))


def draw_matches(left: np.ndarray, right: np.ndarray, left_xy: np.ndarray, right_xy: np.ndarray,
                 max_lines: int = MAX_LINES, gap: int = 8, seed: int = 0) -> np.ndarray:
    """Two images side by side with matches drawn as lines (as ``cv2.drawMatches``).

    Args:
        left: uint8 [H1, W1, 3] RGB (the query).
        right: uint8 [H2, W2, 3] RGB (the reference).
        left_xy: float [n, 2] (x, y) points in `left`'s pixels.
        right_xy: float [n, 2] matching (x, y) points in `right`'s pixels.
        max_lines: at most this many matches are drawn (an even seeded sample).
        gap: white columns between the images.
        seed: the sample's seed.

    Returns:
        uint8 [max(H1, H2), W1 + gap + W2, 3] RGB, images top-aligned on white.

    Raises:
        ValueError: point arrays of different shapes.
    """
    left_xy, right_xy = np.asarray(left_xy, np.float64).reshape(-1, 2), np.asarray(right_xy, np.float64).reshape(-1, 2)
    if left_xy.shape != right_xy.shape:
        raise ValueError(f"point arrays differ: {left_xy.shape} and {right_xy.shape}")
    (h1, w1), (h2, w2) = left.shape[:2], right.shape[:2]
    canvas = np.full((max(h1, h2), w1 + gap + w2, 3), 255, np.uint8)
    canvas[:h1, :w1], canvas[:h2, w1 + gap:] = left, right
    keep = np.arange(len(left_xy))
    if len(keep) == 0:
        return canvas
    if len(keep) > max_lines:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_lines, replace=False))
    hues = (np.arange(len(keep)) * 37) % 180  # spread hues so neighbouring lines differ
    colours = cv2.cvtColor(np.stack([hues, np.full_like(hues, 230), np.full_like(hues, 255)], 1)
                           .astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]
    for (xa, ya), (xb, yb), colour in zip(left_xy[keep], right_xy[keep], colours.tolist(), strict=True):
        a, b = (round(xa), round(ya)), (round(xb) + w1 + gap, round(yb))
        cv2.line(canvas, a, b, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 2, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 2, colour, -1, cv2.LINE_AA)
    return canvas


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"JPEG encoding failed for {path.name}")
    atomic_write_bytes(path, buf.tobytes())


def _digest(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _Pictures:
    """Writes the thumbnails and match pictures into the assets folder, each image read once
    (a few recent ones kept at match size), and remembers which files it wrote."""

    def __init__(self, folder: Path, images: dict[str, Path], keep: int = 64):
        self.folder, self.images, self.keep = folder, images, keep
        self.written: set[str] = set()
        self.thumbs: dict[str, str | None] = {}
        self.failed: dict[str, str] = {}
        self._cache: OrderedDict[str, tuple[np.ndarray, float] | None] = OrderedDict()

    def _load(self, name: str) -> tuple[np.ndarray, float] | None:
        """(the image at match size uint8 [h, w, 3], its scale from original pixels) or None."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        loaded = None
        path = self.images.get(name)
        try:
            if path is None:
                raise ImageReadError(name, "not among the run's images")
            rgb = read_image(path)
            h, w = rgb.shape[:2]
            thumb, _ = resize_max_side(rgb, THUMB_SIDE)
            file = f"t-{_digest(name)}.jpg"
            _write_jpeg(self.folder / file, thumb)
            self.written.add(file)
            self.thumbs[name] = f"{ASSETS_DIR}/{file}"
            scale = min(1.0, fit_size(w, h, MATCH_HEIGHT, MATCH_MAX_WIDTH))
            loaded = (resize_by(rgb, scale), scale)
        except ImageReadError as e:
            self.failed[name] = str(e)
            self.thumbs[name] = None
            logger.debug("report: no picture of %s: %s", name, e)  # the run logged it once already
        self._cache[name] = loaded
        if len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return loaded

    def thumbnail(self, name: str) -> str | None:
        """The relative link of the thumbnail of `name`; None when it cannot be read."""
        if name not in self.thumbs:
            self._load(name)
        return self.thumbs[name]

    def matches(self, query: str, ref: str, q_xy: np.ndarray, r_xy: np.ndarray) -> str | None:
        """The relative link of the match picture of a pair; None when an image cannot be read."""
        left, right = self._load(query), self._load(ref)
        if left is None or right is None:
            return None
        (q_img, q_scale), (r_img, r_scale) = left, right
        picture = draw_matches(q_img, r_img, np.asarray(q_xy) * q_scale, np.asarray(r_xy) * r_scale)
        file = f"m-{_digest(query, ref)}.jpg"
        _write_jpeg(self.folder / file, picture)
        self.written.add(file)
        return f"{ASSETS_DIR}/{file}"

    def remove_stale(self) -> None:
        """Deletes the pictures of an earlier report that this one does not link."""
        for path in self.folder.glob("*.jpg"):
            if path.name not in self.written and path.name[:2] in ("t-", "m-"):
                path.unlink(missing_ok=True)


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table.metrics { border-collapse: collapse; } table.metrics td, table.metrics th { border: 1px solid #ccc;
  padding: 2px 8px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.note { background: #fff6d6; border-left: 4px solid #e0b000; padding: 4px 8px; margin: 4px 0; }
.histograms { display: flex; flex-wrap: wrap; gap: 24px; }
.query-row { border-top: 2px solid #888; padding: 10px 0; }
.query-row h3 { margin: 0 0 6px; font-size: 1.05em; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
figure { margin: 0; padding: 4px; border: 3px solid #ddd; border-radius: 4px; width: 164px; font-size: 12px; }
figure.query { border-color: #3366cc; } figure.correct { border-color: #2a9d47; background: #eef9f0; }
figure.incorrect { border-color: #d1495b; background: #fdf0f1; }
figure img, .matches img { display: block; max-width: 100%; }
figure .name { word-break: break-all; font-weight: 600; }
.mark { font-weight: 700; } .correct .mark { color: #2a9d47; } .incorrect .mark { color: #d1495b; }
.missing { width: 160px; height: 90px; background: #eee; color: #777; display: flex; align-items: center;
  justify-content: center; text-align: center; }
.matches { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 8px; }
.matches figure { width: auto; max-width: 820px; }
.dim { color: #777; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _img(link: str | None, alt: str, reason: str = "unreadable") -> str:
    if link is None:
        return f'<div class="missing">{_e(reason)}</div>'
    return f'<img src="{_e(link)}" alt="{_e(alt)}">'


def histogram_svg(h: Histogram, width: int = 460, height: int = 200) -> str:
    """An inline SVG bar chart of a `Histogram`: per bin, the share of the true pairs
    (green) and of the false pairs (red) that fall in it, counts in each bar's tooltip."""
    left, bottom, top = 40, 46, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    n_true, n_false = max(int(h.true_counts.sum()), 1), max(int(h.false_counts.sum()), 1)
    shares = np.stack([h.true_counts / n_true, h.false_counts / n_false], 1)
    peak = max(float(shares.max()), 1e-9)
    bin_w = plot_w / max(len(h.labels), 1)
    bar_w = bin_w * 0.38
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(h.title)} histogram">',
             f'<text x="{left}" y="14" font-size="13" font-weight="600">{_e(h.title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{peak:.0%}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>']
    for i, label in enumerate(h.labels):
        x0 = left + i * bin_w
        for k, (colour, kind, count) in enumerate((("#2a9d47", "true", h.true_counts[i]),
                                                   ("#d1495b", "false", h.false_counts[i]))):
            bar_h = plot_h * shares[i, k] / peak
            parts.append(f'<rect x="{x0 + bin_w * 0.1 + k * bar_w:.1f}" y="{top + plot_h - bar_h:.1f}" '
                         f'width="{bar_w:.1f}" height="{bar_h:.1f}" fill="{colour}"><title>{_e(label)}: '
                         f'{int(count)} {kind} pairs ({shares[i, k]:.1%})</title></rect>')
        parts.append(f'<text x="{x0 + bin_w / 2:.1f}" y="{top + plot_h + 12}" font-size="9" '
                     f'text-anchor="end" transform="rotate(-35 {x0 + bin_w / 2:.1f} {top + plot_h + 12})">'
                     f'{_e(label)}</text>')
    parts.append(f'<rect x="{width - 150}" y="{top}" width="10" height="10" fill="#2a9d47"/>'
                 f'<text x="{width - 136}" y="{top + 9}" font-size="11">true pairs ({int(h.true_counts.sum())})</text>'
                 f'<rect x="{width - 150}" y="{top + 14}" width="10" height="10" fill="#d1495b"/>'
                 f'<text x="{width - 136}" y="{top + 23}" font-size="11">false pairs ({int(h.false_counts.sum())})'
                 '</text></svg>')
    return "".join(parts)


def _metrics_html(data: ReportData) -> str:
    if not data.metrics:
        return '<p class="dim">No ground truth (test/ground_truth.csv): no metrics.</p>'
    first = next(iter(data.metrics.values()))
    keys = [k for k in first if k != "n_queries"]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    rows = "".join(f"<tr><td>{_e(stage)}</td>" + "".join(f"<td>{_fmt(m.get(k), 4)}</td>" for k in keys) + "</tr>"
                   for stage, m in data.metrics.items())
    return (f'<table class="metrics"><tr><th>stage</th>{head}</tr>{rows}</table>'
            f'<p class="dim">over {first.get("n_queries", "?")} queries with ground truth</p>')


def _timings_html(timings: dict[str, float]) -> str:
    if not timings:
        return ""
    return "<p>time: " + ", ".join(f"{_e(stage)} {s:.1f} s" for stage, s in timings.items()) + "</p>"


def _candidate_html(c: Candidate, pictures: _Pictures) -> str:
    kind = {True: "correct", False: "incorrect", None: "unknown"}[c.correct]
    mark = {True: "&#10003; correct", False: "&#10007; wrong", None: ""}[c.correct]
    verified = ("not verified" if c.inliers is None else
                f"inliers {c.inliers} &middot; p {_fmt(c.probability)}")
    flag = {True: "1", False: "0", None: ""}[c.correct]
    return (f'<figure class="candidate {kind}" data-correct="{flag}">'
            f'{_img(pictures.thumbnail(c.reference), c.reference)}<figcaption>'
            f'<div>#{c.rank} <span class="mark">{mark}</span></div><div class="name">{_e(c.reference)}</div>'
            f'<div>global {_fmt(c.global_score)}</div><div>{verified}</div></figcaption></figure>')


def _match_html(row: QueryRow, c: Candidate, pictures: _Pictures) -> str:
    caption = (f"#{c.rank} {_e(c.reference)}: {c.inliers} inliers, p {_fmt(c.probability)}"
               + {True: " (correct)", False: " (wrong)", None: ""}[c.correct])
    if c.matches is None:
        body = '<div class="missing">matches not kept in the cache entry</div>'
    else:
        if len(c.matches[0]) > MAX_LINES:
            caption += f" &middot; {MAX_LINES} of {len(c.matches[0])} matches drawn"
        link = pictures.matches(row.query, c.reference, *c.matches)
        body = _img(link, f"{row.query} / {c.reference} inlier matches")
    return f'<figure class="pair">{body}<figcaption>{caption}</figcaption></figure>'


def _row_html(i: int, row: QueryRow, pictures: _Pictures) -> str:
    facts = []
    if row.ap is not None:
        facts.append(f"AP {row.ap:.3f} (global {_fmt(row.global_ap)})")
        facts.append(f"{row.n_relevant} relevant")
        facts.append("no correct reference ranked" if row.first_correct is None
                     else f"first correct at rank {row.first_correct}")
    cards = "".join(_candidate_html(c, pictures) for c in row.candidates)
    pairs = "".join(_match_html(row, c, pictures) for c in row.candidates if c.inliers)
    none = [c for c in row.candidates if c.inliers == 0]
    if none:
        pairs += ('<p class="dim">0 inliers (nothing to draw): '
                  + ", ".join(f"#{c.rank} {_e(c.reference)}" for c in none) + "</p>")
    return (f'<section class="query-row" id="q{i}" data-query="{_e(row.query)}"><h3>{i}. {_e(row.query)} '
            f'<span class="dim">{" &middot; ".join(facts)}</span></h3><div class="cards">'
            f'<figure class="query">{_img(pictures.thumbnail(row.query), row.query)}<figcaption>'
            f'<div class="name">query</div><div>{_e(row.query)}</div></figcaption></figure>{cards}</div>'
            + (f'<div class="matches">{pairs}</div>' if pairs else "") + "</section>")


def build_report(out_dir: Path, data: ReportData) -> Path:
    """Writes ``report.html`` and its pictures (``report_files/*.jpg``) into `out_dir`.

    Args:
        out_dir: the run's output folder.
        data: what to show (`collect`).

    Returns:
        The ``report.html`` path. Links are relative (``report_files/<hash>.jpg``), every
        file is written atomically, and pictures of an earlier report that this one does not
        link are deleted.
    """
    out_dir = Path(out_dir)
    pictures = _Pictures(out_dir / ASSETS_DIR, data.images)
    (out_dir / ASSETS_DIR).mkdir(parents=True, exist_ok=True)
    rows = "".join(_row_html(i, row, pictures) for i, row in enumerate(data.rows, 1))
    which = ("the worst by final AP, worst first" if any(r.ap is not None for r in data.rows)
             else "a sample, in name order")
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in data.notes)
    if pictures.failed:
        notes += f'<p class="note">{len(pictures.failed)} images could not be read for the report: ' + \
            _e("; ".join(f"{k}: {v}" for k, v in sorted(pictures.failed.items())[:5])) + "</p>"
    histograms = "".join(histogram_svg(h) for h in data.histograms)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Report: {_e(data.title)}</title>'
            f'<style>{CSS}</style></head><body><h1>Retrieval report: {_e(data.title)}</h1>'
            f'<p class="dim">written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>'
            + "".join(f"<p>{_e(line)}</p>" for line in data.summary) + notes
            + f'<h2>Metrics</h2>{_metrics_html(data)}{_timings_html(data.timings)}'
            + (f'<h2>Verification scores, true vs false pairs</h2><div class="histograms">{histograms}</div>'
               '<p class="dim">Every verified pair of the run; each bar is the share of the true (green) or the '
               'false (red) pairs in its bin; hover a bar for its count.</p>' if histograms else "")
            + f'<h2>Queries ({len(data.rows)}: {which})</h2>'
            '<p class="dim">Each query with its top final references: global similarity, inliers and calibrated '
            'same-product probability; green: correct, red: wrong; below, the inlier matches of each verified '
            f'pair.</p>{rows}</body></html>\n')
    path = out_dir / REPORT_FILE
    atomic_write_bytes(path, page.encode("utf-8", "replace"))  # undecodable name bytes show as "?"
    pictures.remove_stale()
    return path
