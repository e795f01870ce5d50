import json
from pathlib import Path

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


# ---------------------------------------------------------------- the manifest (stages.common.manifest)

@pytest.fixture
def settled(monkeypatch):
    """Records count as settled at once (normally an entry written less than RACY_NS before
    its stat was confirmed is read to check it), and a counter of the entries read."""
    from stages.common import cache, manifest, matrix

    monkeypatch.setattr(manifest, "RACY_NS", -1)
    reads = []
    original = cache.load_npz
    for module in (cache, matrix):
        monkeypatch.setattr(module, "load_npz",
                            lambda path, keys=None: reads.append(Path(path).stem) or original(path, keys))
    return reads


def sources(tmp_path, names):
    out = {}
    for name in names:
        out[name] = tmp_path / "src" / f"{name}.jpg"
        out[name].parent.mkdir(exist_ok=True)
        out[name].write_bytes(name.encode())
    return out


def test_a_warm_check_reads_the_manifest_not_the_entries(tmp_path, settled):
    images = sources(tmp_path, ["a", "b", "c"])
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    for name in ("a", "b"):
        store.write(name, arrays(2), images[name])
    store.write_error("c", "not a decodable image", images["c"])
    store.flush()
    assert not list((store.dir / "manifest.d").glob("*.jsonl"))  # merged into manifest.json
    again = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    assert again.missing(images) == [] and settled == []
    assert again.records(images)["c"]["e"] == "not a decodable image"
    images["b"].write_bytes(b"changed")
    assert again.missing(images) == ["b"] and settled == []
    assert again.read("a")["keypoints_xy"].shape == (2, 2) and settled == ["a"]  # read in full when used


def test_a_deleted_or_truncated_entry_is_detected(tmp_path, settled):
    images = sources(tmp_path, ["a", "b", "c"])
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    for name in images:
        store.write(name, arrays(3), images[name])
    store.flush()
    store.path("a").unlink()
    store.path("b").write_bytes(store.path("b").read_bytes()[:-7])
    assert store.missing(images) == ["a", "b"]
    assert settled == ["b"]  # its stat changed: read, found damaged
    assert store.read_or_none("b", images["b"]) is None


def test_a_recent_entry_rewritten_in_place_is_checked_by_reading_it(tmp_path):
    """Within RACY_NS of its write an entry's stat cannot tell an in-place rewrite that kept
    its size (a timestamp tick is coarse): it is read instead (the real RACY_NS here)."""
    images = sources(tmp_path, ["a"])
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    store.write("a", {"descriptor": np.arange(256, dtype=np.float32)}, images["a"])
    store.flush()
    raw = bytearray(store.path("a").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    with open(store.path("a"), "r+b") as f:  # same inode, same size
        f.write(bytes(raw))
    assert store.missing(images) == ["a"]


def test_an_old_store_without_manifest_is_scanned_once(tmp_path, settled):
    import shutil

    images = sources(tmp_path, ["a", "b"])
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    for name in images:
        store.write(name, arrays(1), images[name])
    store.flush()
    (store.dir / "manifest.json").unlink()
    shutil.rmtree(store.dir / "manifest.d", ignore_errors=True)
    old = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    assert old.missing(images) == [] and sorted(settled) == ["a", "b"]
    assert (store.dir / "manifest.json").exists()
    settled.clear()
    assert FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc").missing(images) == [] and settled == []


def test_the_manifest_survives_concurrent_writers(tmp_path, settled):
    """Four processes write into one store at once (the same names too), one killed before
    it merged its journal: the manifest then vouches for every entry as it is on disk."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    names = [f"n{i}" for i in range(40)]
    images = sources(tmp_path, names)
    root = tmp_path / "c"
    FeatureStore(root, "global", {"name": "x"}, "abc")

    def writer(k, names, hang=False):
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport numpy as np, time\n"
                f"from stages.common.cache import FeatureStore\n"
                f"s = FeatureStore({str(root)!r}, 'global', {{'name': 'x'}}, 'abc')\n"
                f"src = {str(tmp_path / 'src')!r}\n"
                f"for n in {names!r}:\n"
                f"    s.write(n, {{'descriptor': np.full(8, {k}, np.float32)}}, src + f'/{{n}}.jpg')\n"
                + ("print('done', flush=True); time.sleep(60)\n" if hang else "s.flush()\n"))
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    procs = [writer(k, names[k * 10:k * 10 + 20]) for k in range(3)] + [writer(3, names[30:] + names[:5], hang=True)]
    for proc in procs[:3]:
        assert proc.wait(120) == 0
    assert procs[3].stdout.readline().strip() == "done"
    os.kill(procs[3].pid, signal.SIGKILL)
    procs[3].wait(30)
    store = FeatureStore(root, "global", {"name": "x"}, "abc")
    store.flush()  # merges the killed writer's journal
    assert not list((store.dir / "manifest.d").glob("*.jsonl"))
    assert store.missing(images) == [] and settled == []
    entries = json.loads((store.dir / "manifest.json").read_text())["entries"]
    assert sorted(entries) == sorted(names)
    for name in names:  # each record describes the file that won
        st = store.path(name).stat()
        assert (entries[name]["z"], entries[name]["m"], entries[name]["i"]) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_the_descriptor_matrix_reads_only_new_or_changed_entries(tmp_path, settled):
    from stages.common.matrix import NO_FEATURES, load_rows

    images = sources(tmp_path, ["a", "b", "c", "bad"])
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    for i, name in enumerate(["a", "b"]):
        store.write(name, {"descriptor": np.full(4, i, np.float32)}, images[name])
    store.write_error("bad", "empty file (0 bytes)", images["bad"])
    store.flush()
    names, rows, errors = load_rows(store, {n: images[n] for n in ("a", "b", "bad")})
    assert names == ["a", "b"] and rows.tolist() == [[0] * 4, [1] * 4] and errors == {"bad": "empty file (0 bytes)"}
    assert sorted(settled) == ["a", "b"] and (store.dir / "matrix" / "descriptor.npz").exists()
    settled.clear()
    store.write("c", {"descriptor": np.full(4, 2, np.float32)}, images["c"])
    store.write("a", {"descriptor": np.full(4, 5, np.float32)}, images["a"])
    store.flush()
    names, rows, errors = load_rows(store, images)
    assert names == ["a", "b", "c"] and rows[:, 0].tolist() == [5, 1, 2]
    assert sorted(settled) == ["a", "c", "descriptor"]  # the matrix file and the two changed entries
    settled.clear()
    names, rows, errors = load_rows(store, {"b": images["b"], "gone": None})
    assert names == ["b"] and rows.tolist() == [[1] * 4] and errors == {"gone": NO_FEATURES}
    assert settled == ["descriptor"]  # the matrix file alone
    (store.dir / "matrix" / "descriptor.npz").write_bytes(b"junk")
    settled.clear()
    assert load_rows(store, images)[1][:, 0].tolist() == [5, 1, 2] and sorted(settled) == ["a", "b", "c", "descriptor"]
