"""The hackathon folder layout: class folders for training, query and reference folders for test.

    <root>/train/train_data/<class_id>/*.jpg      (optional: only training needs it)
    <root>/test/test_data/query/*.jpg
    <root>/test/test_data/reference/*.jpg
    <root>/test/ground_truth.csv                 (optional: columns query,reference)

An image's name is its file stem. jpg, jpeg, png, bmp and webp are read in any letter
case; hidden files (leading ".") are ignored, and so are other files (one log line says
how many). A symbolic link is an image under its own name, wherever it points; a broken
one is listed too, and reported unreadable by the run.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

from . import logger
from .images import IMAGE_EXTENSIONS, is_image_file

QUERY_DIR = Path("test/test_data/query")
REFERENCE_DIR = Path("test/test_data/reference")
TRAIN_DIR = Path("train/train_data")
GROUND_TRUTH = Path("test/ground_truth.csv")

EXPECTED_LAYOUT = """expected layout:
  DATA/train/train_data/<class_id>/*.jpg   (training only)
  DATA/test/test_data/query/*.jpg
  DATA/test/test_data/reference/*.jpg
  DATA/test/ground_truth.csv               (optional: columns query,reference)
images: """ + ", ".join(IMAGE_EXTENSIONS) + " (any letter case)"


class LayoutError(ValueError):
    """The data folder does not follow the hackathon layout, or names clash."""


@dataclass
class Dataset:
    """Image paths of one data folder, keyed by image name (file stem), sorted by name.

    Attributes:
        root: the data folder.
        queries: {query name: path}.
        references: {reference name: path}.
        train: {class id: [paths]} (empty when there is no train folder).
        ground_truth: {query name: set of relevant reference names}, or None without
            ground_truth.csv.
    """

    root: Path
    queries: dict[str, Path]
    references: dict[str, Path]
    train: dict[str, list[Path]] = field(default_factory=dict)
    ground_truth: dict[str, set[str]] | None = None

    @property
    def images(self) -> dict[str, Path]:
        """Queries and references together (their names are disjoint)."""
        return {**self.references, **self.queries}

    def training_images(self) -> tuple[dict[str, Path], dict[str, str]]:
        """Training images keyed ``train:<class>/<stem>`` (unique across classes, never a test
        name since test names hold no "/"), and the class of each: ({key: path}, {key: class})."""
        images, labels = {}, {}
        for label, paths in self.train.items():
            for path in paths:
                key = f"train:{label}/{path.stem}"
                images[key], labels[key] = path, label
        return images, labels


def list_images(folder: Path) -> dict[str, Path]:
    """{file stem: path} of the image files directly in `folder`, sorted by name.

    Other entries (files without an image extension, folders, hidden files) are left
    out, and counted in one log line.

    Raises:
        LayoutError: the folder cannot be listed, or two files share a stem (e.g. a.jpg
            and a.png); the message lists them.
    """
    by_name: dict[str, list[Path]] = {}
    ignored = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise LayoutError(f"{folder}: cannot list the folder ({e.strerror or e})") from e
    for path in entries:
        if is_image_file(path):
            by_name.setdefault(path.stem, []).append(path)
        elif not path.name.startswith("."):
            ignored.append(path.name)
    if ignored:
        logger.info("%s: ignoring %d entries that are not image files (%s): %s", folder, len(ignored),
                    " ".join(IMAGE_EXTENSIONS), ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else ""))
    clashes = {n: p for n, p in by_name.items() if len(p) > 1}
    if clashes:
        lines = [f"  {n}: " + ", ".join(p.name for p in ps) for n, ps in sorted(clashes.items())]
        raise LayoutError(f"{folder}: several files share a name (file stem):\n" + "\n".join(lines))
    return {n: ps[0] for n, ps in sorted(by_name.items())}


def read_ground_truth(path: Path) -> dict[str, set[str]]:
    """Reads query,reference rows (one per relevant pair) into {query: {references}}.

    Raises:
        LayoutError: the file cannot be read as UTF-8 CSV, or its header lacks a query or
            reference column.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            if "query" not in fields or "reference" not in fields:
                raise LayoutError(f"{path}: needs a header with columns query,reference; found {fields}")
            reader.fieldnames = fields
            gt: dict[str, set[str]] = {}
            for row in reader:
                q, r = (row["query"] or "").strip(), (row["reference"] or "").strip()
                if q and r:
                    gt.setdefault(q, set()).add(r)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LayoutError(f"{path}: cannot read the ground truth ({e})") from e
    return gt


def load_dataset(root: Path, require_test: bool = True) -> Dataset:
    """Reads the hackathon layout under `root`.

    Args:
        root: data folder.
        require_test: demand the query and reference folders (False for training only).

    Raises:
        LayoutError: a required folder is missing or empty, or names clash; the message
            shows the expected layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"data folder {root} does not exist\n{EXPECTED_LAYOUT}")
    queries, references = {}, {}
    if require_test:
        for sub in (QUERY_DIR, REFERENCE_DIR):
            if not (root / sub).is_dir():
                raise LayoutError(f"{root}: missing folder {sub}\n{EXPECTED_LAYOUT}")
        queries = list_images(root / QUERY_DIR)
        references = list_images(root / REFERENCE_DIR)
        for kind, found, sub in (("query", queries, QUERY_DIR), ("reference", references, REFERENCE_DIR)):
            if not found:
                raise LayoutError(f"{root / sub}: no {kind} images\n{EXPECTED_LAYOUT}")
        both = sorted(set(queries) & set(references))
        if both:
            raise LayoutError(f"{root}: names used by both a query and a reference: {both[:10]}")
    train = {}
    if (root / TRAIN_DIR).is_dir():
        try:
            for class_dir in sorted(p for p in (root / TRAIN_DIR).iterdir()
                                    if p.is_dir() and not p.name.startswith(".")):
                paths = [p for p in sorted(class_dir.iterdir()) if is_image_file(p)]
                if paths:
                    train[class_dir.name] = paths
        except OSError as e:
            raise LayoutError(f"{root / TRAIN_DIR}: cannot list the class folders ({e.strerror or e})") from e
    elif not require_test:
        raise LayoutError(f"{root}: missing folder {TRAIN_DIR}\n{EXPECTED_LAYOUT}")
    gt_path = root / GROUND_TRUTH
    gt = read_ground_truth(gt_path) if gt_path.exists() else None
    return Dataset(root, queries, references, train, gt)
