import numpy as np
import pytest

from stages.common.dataset import LayoutError, load_dataset
from tests.conftest import write_image

RGB = np.full((8, 8, 3), 128, np.uint8)


def make_layout(root, queries=("q1.jpg",), refs=("r1.jpg",), train=None, gt=None):
    for name in queries:
        write_image(root / "test/test_data/query" / name, RGB)
    for name in refs:
        write_image(root / "test/test_data/reference" / name, RGB)
    for cls, names in (train or {}).items():
        for name in names:
            write_image(root / "train/train_data" / cls / name, RGB)
    if gt is not None:
        (root / "test/ground_truth.csv").write_text(gt)
    return root


def test_reads_layout_names_are_stems_any_case(tmp_path):
    make_layout(tmp_path, queries=("a.JPG", "b.jpeg", ".hidden.jpg"), refs=("c.PNG", "d.webp", "e.BMP"),
                train={"001": ["x.jpg", "y.png"], "002": ["z.jpg"]}, gt="query,reference\na,c\na,d\nb,e\n")
    (tmp_path / "test/test_data/reference/notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path)
    assert list(ds.queries) == ["a", "b"]
    assert list(ds.references) == ["c", "d", "e"]
    assert {k: [p.name for p in v] for k, v in ds.train.items()} == {"001": ["x.jpg", "y.png"], "002": ["z.jpg"]}
    assert ds.ground_truth == {"a": {"c", "d"}, "b": {"e"}}


def test_ground_truth_is_optional(tmp_path):
    assert load_dataset(make_layout(tmp_path)).ground_truth is None


def test_missing_folder_shows_expected_layout(tmp_path):
    (tmp_path / "test/test_data/query").mkdir(parents=True)
    with pytest.raises(LayoutError, match="missing folder test/test_data/reference") as e:
        load_dataset(tmp_path)
    assert "expected layout" in str(e.value)


def test_empty_reference_folder_is_an_error(tmp_path):
    make_layout(tmp_path, refs=())
    (tmp_path / "test/test_data/reference").mkdir(parents=True, exist_ok=True)
    with pytest.raises(LayoutError, match="no reference images"):
        load_dataset(tmp_path)


def test_same_stem_twice_lists_the_files(tmp_path):
    make_layout(tmp_path, refs=("r1.jpg", "r1.png", "r2.jpg"))
    with pytest.raises(LayoutError, match=r"r1: r1\.jpg, r1\.png"):
        load_dataset(tmp_path)


def test_ground_truth_needs_its_columns(tmp_path):
    make_layout(tmp_path, gt="q,r\nq1,r1\n")
    with pytest.raises(LayoutError, match="query,reference"):
        load_dataset(tmp_path)
