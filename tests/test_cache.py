import json

import numpy as np
import pytest

from stages.common.cache import CacheMismatchError, FeatureStore, encode_name


def arrays(n):
    return {"keypoints_xy": np.arange(2 * n, dtype=np.float32).reshape(n, 2),
            "descriptors": np.ones((n, 40), np.float16)}


@pytest.mark.parametrize("n", [0, 1, 5])
def test_round_trip_including_empty(tmp_path, n):
    store = FeatureStore(tmp_path, "local", {"name": "x", "a": 1}, "abc")
    store.write("img", arrays(n))
    back = store.read("img")
    assert back["keypoints_xy"].shape == (n, 2) and back["descriptors"].dtype == np.float16
    np.testing.assert_array_equal(back["keypoints_xy"], arrays(n)["keypoints_xy"])
    assert not list(store.dir.glob(".tmp-*"))


def test_conf_is_stored_and_a_different_hash_is_refused(tmp_path):
    store = FeatureStore(tmp_path, "global", {"name": "x", "a": 1}, "abc")
    assert json.loads((store.dir / "conf.json").read_text()) == {"hash": "abc", "conf": {"name": "x", "a": 1}}
    (store.dir / "conf.json").write_text(json.dumps({"hash": "zzz", "conf": {}}))
    with pytest.raises(CacheMismatchError):
        FeatureStore(tmp_path, "global", {"name": "x", "a": 1}, "abc")


def test_corrupt_entry_is_recomputed_not_trusted(tmp_path):
    store = FeatureStore(tmp_path, "global", {"name": "x"}, "abc")
    store.write("img", arrays(3))
    store.path("img").write_bytes(store.path("img").read_bytes()[:50])
    assert store.read_or_none("img") is None
    assert not store.path("img").exists()
    assert store.missing({"img": None}) == ["img"]


def test_entry_from_another_conf_hash_is_rejected(tmp_path):
    a = FeatureStore(tmp_path, "global", {"name": "x"}, "aaa")
    a.write("img", arrays(1))
    b = FeatureStore(tmp_path, "global", {"name": "x"}, "bbb")
    b.path("img").write_bytes(a.path("img").read_bytes())
    with pytest.raises(ValueError, match="conf hash"):
        b.read("img")


def test_changed_source_file_makes_entry_stale(tmp_path):
    src = tmp_path / "img.jpg"
    src.write_bytes(b"one")
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    store.write("img", arrays(1), source=src)
    assert store.missing({"img": src}) == []
    src.write_bytes(b"changed")
    assert store.missing({"img": src}) == ["img"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/b", ".hidden", "spaced name", "ñame_日本",
                                  "x" * 300])
def test_names_stay_inside_the_store(tmp_path, name):
    store = FeatureStore(tmp_path, "global", {"name": "x"}, "abc")
    store.write(name, arrays(1))
    path = store.path(name)
    assert path.parent == store.dir and path.exists()
    assert "/" not in encode_name(name) and not encode_name(name).startswith(".")
    assert len(path.name) < 255
    if len(name) < 100:
        assert store.names() == {name}


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    store = FeatureStore(tmp_path, "global", {"name": "x"}, "abc")
    store.write("img", arrays(1))
    umask = os.umask(0)
    os.umask(umask)
    assert store.path("img").stat().st_mode & 0o777 == 0o666 & ~umask
