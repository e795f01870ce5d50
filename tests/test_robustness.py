"""Messy data, interrupted runs and concurrent runs (docs/messy_data.md).

Every bad case is generated here, in a temp folder, with tiny images. The pipeline runs
with all stages: in-process for the messy folder, as subprocesses for the SIGKILL and
concurrency checks, which compare rankings.json byte for byte with an uninterrupted run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from stages.common.cache import (
    FeatureStore,
    atomic_write_json,
    decode_name,
    encode_name,
    exclusive_lock,
    load_npz,
    remove_stale_temp_files,
)
from stages.common.image_header import read_header
from stages.common.images import ImageReadError, read_image
from stages.common.shortlist import read_pairs, write_pairs
from tests.conftest import collected_logs

ROOT = Path(__file__).resolve().parent.parent
QUERY = Path("test/test_data/query")
REFERENCE = Path("test/test_data/reference")
LATIN1_NAME = os.fsdecode(b"latin\xe9")  # a file name that is not UTF-8 (kept as a surrogate escape)


# ---------------------------------------------------------------- generated files

def photo(name: str, size=(112, 84)) -> np.ndarray:
    """A scikit-image photo as uint8 RGB [h, w, 3], resized to `size` (w, h)."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return cv2.resize(np.ascontiguousarray(image[..., :3]), size, interpolation=cv2.INTER_AREA)


def view(rgb: np.ndarray, angle: float = 8.0, scale: float = 0.9) -> np.ndarray:
    """Another photo of the same thing: rotated, scaled, on white."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    return cv2.warpAffine(rgb, m, (w, h), borderValue=(255, 255, 255))


def encode(rgb: np.ndarray, ext: str = ".jpg", *params) -> bytes:
    """uint8 RGB [H, W, 3] (or an array OpenCV takes as it is) -> encoded file bytes."""
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def with_exif(rgb: np.ndarray, path: Path, orientation: int, **kwargs) -> Path:
    """Saves `rgb` through Pillow (format from the suffix) with an EXIF Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, exif=exif, **kwargs)
    return path


def rgba_png(rgb: np.ndarray, alpha: np.ndarray) -> bytes:
    return encode(np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), alpha]), ".png")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ---------------------------------------------------------------- read_image, case by case

def _case(tmp: Path, kind: str) -> Path:
    rgb = photo("astronaut")
    if kind == "zero-byte":
        return put(tmp / "empty.jpg", b"")
    if kind == "truncated-jpeg":
        return put(tmp / "cut.jpg", truncated(encode(rgb)))
    if kind == "truncated-png":
        return put(tmp / "cut.png", truncated(encode(rgb, ".png")))
    if kind == "not-an-image":
        return put(tmp / "notes.jpg", b"name,price\nmug,3\n" * 20)
    if kind == "broken-symlink":
        (tmp / "link.jpg").symlink_to(tmp / "gone.jpg")
        return tmp / "link.jpg"
    if kind == "huge-header":
        # A PNG whose header claims 40000 x 40000 pixels (a decompression bomb): refused
        # from the header, before anything is allocated.
        data = encode(photo("astronaut", (16, 16)), ".png")
        ihdr = b"IHDR" + (40000).to_bytes(4, "big") * 2 + data[24:29]
        return put(tmp / "bomb.png", data[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + data[33:])
    raise ValueError(kind)


@pytest.mark.parametrize("kind, reason", [
    ("zero-byte", "empty file (0 bytes)"),
    ("truncated-jpeg", "truncated JPEG"),
    ("truncated-png", "not a decodable image"),
    ("not-an-image", "not a decodable image"),
    ("broken-symlink", "broken symbolic link"),
    ("huge-header", "too large (1600000000 pixels"),
])
def test_unreadable_files_raise_with_file_and_reason(tmp_path, kind, reason):
    path = _case(tmp_path, kind)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert str(path) in str(e.value) and reason in e.value.reason
    # Only a file that could not be read at all is retried by the next run.
    assert e.value.transient == (kind == "broken-symlink")


def test_png_with_alpha_is_composited_on_white(tmp_path):
    rgb = photo("rocket")
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    alpha[:, 20:40] = 128
    out = read_image(put(tmp_path / "a.png", rgba_png(rgb, alpha)))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert (out[:, :20] == 255).all()
    np.testing.assert_array_equal(out[:, 40:], rgb[:, 40:])
    half = np.round(rgb[:, 20:40].astype(np.float32) * (128 / 255) + 255 * (1 - 128 / 255))
    np.testing.assert_allclose(out[:, 20:40], half, atol=1)


def test_cmyk_jpeg_gives_rgb(tmp_path):
    rgb = photo("coffee")
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = read_image(path)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 12  # the colours, not inverted ones


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_png_is_scaled_to_8_bit(tmp_path, channels):
    rgb = photo("chelsea")
    bgr = rgb[..., ::-1].astype(np.uint16) * 257
    image = {1: bgr[..., 2], 3: bgr, 4: np.dstack([bgr, np.full(rgb.shape[:2], 65535, np.uint16)])}[channels]
    ok, buf = cv2.imencode(".png", image)
    out = read_image(put(tmp_path / "deep.png", buf.tobytes()))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    expected = np.repeat(rgb[..., :1], 3, axis=2) if channels == 1 else rgb
    np.testing.assert_array_equal(out, expected)


def test_grayscale_gives_three_equal_channels(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(photo("camera")[..., 0]).save(path)
    out = read_image(path)
    assert out.shape == (84, 112, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_exif_orientation_6_turns_a_landscape_jpeg_portrait(tmp_path):
    rgb = photo("astronaut", (120, 60))  # stored 120 wide, 60 high
    out = read_image(with_exif(rgb, tmp_path / "rot.jpg", 6, quality=95))
    assert out.shape == (120, 60, 3)
    # Orientation 6: the stored image is turned 90 degrees clockwise for display.
    assert np.abs(out.astype(int) - np.rot90(rgb, -1)).mean() < 6


@pytest.mark.parametrize("fmt", ["png", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_png_and_webp_matches_opencv(tmp_path, fmt, orientation):
    """PNG/WebP are decoded with alpha and 16 bits kept, where OpenCV ignores EXIF; the
    orientation read from the header must give what OpenCV's own colour decode shows."""
    rgb = photo("astronaut", (30, 20))
    path = with_exif(rgb, tmp_path / f"o.{fmt}", orientation, **({"lossless": True} if fmt == "webp" else {}))
    shown = cv2.cvtColor(cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image(path), shown)
    assert read_image(path).shape[:2] == ((20, 30) if orientation < 5 else (30, 20))


@pytest.mark.parametrize("name, size", [("wide.jpg", (6000, 150)), ("tall.png", (150, 6000)), ("tiny.png", (8, 8)),
                                        ("one.png", (1, 1)), ("UPPER.JPG", (64, 48)), ("Spaced Name.JPEG", (64, 48)),
                                        ("café_日本.jpg", (64, 48)), (LATIN1_NAME + ".bmp", (64, 48)),
                                        ("odd.WEBP", (64, 48))])
def test_odd_sizes_and_names_are_read(tmp_path, name, size):
    path = put(tmp_path / name, encode(photo("coffee", size), Path(name).suffix.lower()))
    assert read_image(path).shape == (size[1], size[0], 3)


@pytest.mark.parametrize("ext, params", [(".jpg", ()), (".png", ()), (".bmp", ()), (".webp", ()),
                                         (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))])
def test_header_gives_the_size_without_decoding(ext, params):
    data = encode(photo("coffee", (70, 30)), ext, *params)
    header = read_header(data)
    assert (header.format, header.width, header.height) == (ext[1:].replace("jpg", "jpeg"), 70, 30)
    for cut in (0, 3, 12, 20):  # cut short: no exception, just less information
        read_header(data[:cut])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_large_image_memory_stays_bounded(tmp_path):
    """A 9000 x 7000 JPEG is decoded without extra copies and shrunk before any network;
    a 40000 x 40000 PNG header is refused before decoding. Measured in a fresh process.

    The peak is VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a
    child of the pytest process (TensorFlow loaded) would start at the parent's peak.
    """
    big = put(tmp_path / "huge.jpg", encode(cv2.resize(photo("coffee"), (9000, 7000)), ".jpg",
                                            cv2.IMWRITE_JPEG_QUALITY, 80))
    bomb = _case(tmp_path, "huge-header")
    script = textwrap.dedent(f"""
        import json, re, sys
        sys.path.insert(0, {str(ROOT)!r})
        from stages.common.images import ImageReadError, read_image, resize_max_side
        def peak_mb():
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
        before = peak_mb()
        image = read_image({str(big)!r})
        shape = image.shape
        small, _ = resize_max_side(image, 512)
        del image
        after_big = peak_mb()
        try:
            read_image({str(bomb)!r})
        except ImageReadError as e:
            refused = e.reason
        print(json.dumps({{"before": before, "big": after_big, "after": peak_mb(), "shape": shape,
                          "small": small.shape, "refused": refused}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["shape"] == [7000, 9000, 3] and max(m["small"]) == 512
    decoded_mb = 9000 * 7000 * 3 / 2**20  # 180 MB
    # OpenCV's decoder peaks at twice the decoded pixels; the RGB conversion is in place.
    assert decoded_mb < m["big"] - m["before"] < 2.5 * decoded_mb, m
    assert m["after"] - m["big"] < 20 and "too large" in m["refused"], m


def test_global_network_input_is_resized():
    """The backbone never sees more than resize_max pixels a side, whatever the image."""
    from stages.global_embed import extract
    from stages.global_embed.models import FeatureModel

    seen = []

    class Recorder(FeatureModel):
        def __call__(self, rgb):
            seen.append(rgb.shape)
            return np.ones((max(1, rgb.shape[0] // 32), max(1, rgb.shape[1] // 32), 8), np.float32)

    conf = extract.default_conf
    for shape in [(7000, 9000, 3), (150, 6000, 3), (8, 8, 3)]:
        out = extract.describe(Recorder(), np.zeros(shape, np.uint8), conf)
        assert out.shape == (len(conf["regions"]), 8) and np.isfinite(out).all()
    assert max(max(s[:2]) for s in seen) <= conf["resize_max"] and min(min(s[:2]) for s in seen) >= 1


# ---------------------------------------------------------------- cache and hand-off files

def test_names_with_tabs_newlines_and_foreign_bytes_survive_the_pairs_file(tmp_path):
    pairs = [("q\ttab", "r\nnewline"), ("q\ttab", "back\\slash"), (LATIN1_NAME, "café 日本"), ("a", "cr\r")]
    write_pairs(tmp_path / "pairs.txt", pairs)
    assert read_pairs(tmp_path / "pairs.txt") == {"q\ttab": ["r\nnewline", "back\\slash"], LATIN1_NAME: ["café 日本"],
                                                  "a": ["cr\r"]}
    write_pairs(tmp_path / "empty.txt", [])
    assert read_pairs(tmp_path / "empty.txt") == {}


def test_foreign_byte_names_round_trip_through_cache_and_json(tmp_path):
    store = FeatureStore(tmp_path, "global", {"name": "x"}, "abc")
    store.write(LATIN1_NAME, {"a": np.ones(2, np.float32)})
    assert store.path(LATIN1_NAME).parent == store.dir and store.names() == {LATIN1_NAME}
    assert decode_name(encode_name(LATIN1_NAME)) == LATIN1_NAME
    atomic_write_json(tmp_path / "r.json", {LATIN1_NAME: ["café"]})
    assert json.loads((tmp_path / "r.json").read_text()) == {LATIN1_NAME: ["café"]}
    atomic_write_json(tmp_path / "plain.json", {"café": 1})  # readable UTF-8 when possible
    assert "café" in (tmp_path / "plain.json").read_text(encoding="utf-8")


def test_damaged_entry_is_recomputed_not_trusted(tmp_path):
    """A flipped bit inside an array fails the zip CRC-32 check on read."""
    src = put(tmp_path / "img.jpg", b"x")
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    store.write("img", {"descriptor": np.arange(256, dtype=np.float32)}, src)
    assert store.missing({"img": src}) == []
    raw = bytearray(store.path("img").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    store.path("img").write_bytes(bytes(raw))
    assert store.missing({"img": src}) == ["img"]
    assert store.read_or_none("img", src) is None and not store.path("img").exists()


def test_error_entries_are_kept_or_retried(tmp_path):
    src = put(tmp_path / "img.jpg", b"x")
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    store.write_error("bad", "empty file (0 bytes)", src)
    store.write_error("gone", "cannot read file (Permission denied)", src, retry=True)
    assert store.missing({"bad": src, "gone": src}) == ["gone"]
    assert str(store.read("gone", src)["error"]) == "cannot read file (Permission denied)"
    store.write_error("missing", "broken symbolic link", tmp_path / "nowhere.jpg", retry=True)
    assert store.missing({"missing": tmp_path / "nowhere.jpg"}) == ["missing"]


def test_writes_replace_symlinks_instead_of_following_them(tmp_path):
    outside = put(tmp_path / "outside" / "victim.npz", b"keep me")
    store = FeatureStore(tmp_path / "c", "global", {"name": "x"}, "abc")
    store.path("img").symlink_to(outside)
    store.write("img", {"a": np.ones(2)})
    assert outside.read_bytes() == b"keep me" and not store.path("img").is_symlink()


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code],
                            stdout=subprocess.PIPE, text=True)


def test_a_killed_lock_holder_releases_the_lock(tmp_path):
    lock = tmp_path / "pca.lock"
    child = _child(f"from stages.common.cache import exclusive_lock\nimport time\n"
                   f"with exclusive_lock({str(lock)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    try:
        assert child.stdout.readline().strip() == "locked"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        start = time.perf_counter()
        with exclusive_lock(lock):
            assert time.perf_counter() - start < 5
    finally:
        child.kill()


def test_a_killed_writer_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "out" / "rankings.json"
    child = _child(f"from pathlib import Path\nfrom stages.common.cache import atomic_write_json\n"
                   f"for i in range(100000):\n"
                   f"    atomic_write_json(Path({str(target)!r}), {{'i': i, 'pad': ['x' * 100] * 20000}})\n"
                   f"    print(i, flush=True)\n")
    try:
        for _ in range(3):  # a few writes done, the next one under way
            child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert len(json.loads(target.read_text())["pad"]) == 20000
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".tmp-")] == ["rankings.json"]
    remove_stale_temp_files(target.parent, age_s=0)
    assert [p.name for p in target.parent.iterdir()] == ["rankings.json"]


# ---------------------------------------------------------------- the pipeline on a messy folder

@pytest.fixture(scope="module")
def converted_weights(weights_cache):
    """The session cache with the converted backbone weights in it."""
    from stages.common.backbone import efficientnet_lite as lite

    lite.imagenet_weights(weights_cache)
    return weights_cache / "weights"


def new_cache(path: Path, weights: Path) -> Path:
    """An empty cache folder holding (hard links to) the converted weights."""
    shutil.copytree(weights, path / "weights", copy_function=os.link)
    return path


UNREADABLE_REFS = {"empty": "empty file (0 bytes)", "truncated": "truncated JPEG", "not_an_image":
                   "not a decodable image", "cut": "not a decodable image", "dangling": "broken symbolic link"}
UNREADABLE_QUERIES = {"q_empty": "empty file (0 bytes)", "q_not_an_image": "not a decodable image"}
# query -> the reference it shows
MATCHES = {"q plain": "plain", "Q_UPPER": "Upper Case", "q_カフェ": "café_日本", "q_exif8": "exif6",
           "q_alpha": "alpha", "q_linked": "linked", "q_latin": LATIN1_NAME}


def build_messy(root: Path, outside: Path) -> Path:
    """A data folder with every kind of bad input of docs/messy_data.md."""
    ref, qry = root / REFERENCE, root / QUERY
    put(ref / "plain.jpg", encode(photo("astronaut")))
    put(ref / "Upper Case.JPG", encode(photo("chelsea")))
    put(ref / "café_日本.jpg", encode(photo("coffee")))
    rocket, alpha = photo("rocket"), np.full((84, 112), 255, np.uint8)
    alpha[:, :12] = 0
    put(ref / "alpha.png", rgba_png(rocket, alpha))
    Image.fromarray(photo("immunohistochemistry")).convert("CMYK").save(ref / "cmyk.jpg", quality=92)
    ok, buf = cv2.imencode(".png", photo("hubble_deep_field")[..., ::-1].astype(np.uint16) * 257)
    put(ref / "deep16.png", buf.tobytes())
    Image.fromarray(photo("camera")[..., 0]).save(ref / "gray.jpg")
    # Stored turned a quarter anticlockwise, Orientation 6 shows it upright (landscape).
    with_exif(np.rot90(photo("retina"), 1).copy(), ref / "exif6.jpg", 6, quality=92)
    put(ref / "wide.jpg", encode(cv2.resize(photo("coins"), (6000, 150))))
    put(ref / "tiny.png", encode(photo("astronaut", (8, 8)), ".png"))
    put(ref / "huge.jpg", encode(cv2.resize(photo("moon"), (9000, 7000)), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 80))
    put(ref / "blank.jpg", encode(np.full((64, 64, 3), 255, np.uint8)))
    put(outside / "outside.jpg", encode(photo("page")))
    (ref / "linked.jpg").symlink_to(outside / "outside.jpg")
    (ref / "dangling.jpg").symlink_to(outside / "gone.jpg")
    put(ref / f"{LATIN1_NAME}.jpg", encode(photo("brick")))
    put(ref / "tab\tname.jpg", encode(photo("gravel")))
    put(ref / "100%.jpg", encode(photo("text")))
    put(ref / "empty.jpg", b"")
    put(ref / "truncated.jpg", truncated(encode(photo("clock"))))
    put(ref / "not_an_image.jpg", b"this is not an image\n" * 10)
    put(ref / "cut.png", truncated(encode(photo("logo"), ".png")))
    put(ref / "notes.txt", b"not an image extension: ignored")
    (ref / "folder.jpg").mkdir()
    put(ref / ".hidden.jpg", encode(photo("coffee")))

    put(qry / "q plain.jpg", encode(view(photo("astronaut"))))
    put(qry / "Q_UPPER.JPEG", encode(view(photo("chelsea"), -6)))
    put(qry / "q_カフェ.jpg", encode(view(photo("coffee"), 5, 1.0)))
    # Stored turned a quarter clockwise, Orientation 8 shows it upright.
    with_exif(np.rot90(view(photo("retina")), -1).copy(), qry / "q_exif8.jpg", 8, quality=92)
    put(qry / "q_alpha.png", rgba_png(view(rocket, -4), alpha))
    put(qry / "q_linked.jpg", encode(view(photo("page"), 4)))
    put(qry / "q_latin.jpg", encode(view(photo("brick"), -5)))
    put(qry / "q_empty.jpg", b"")
    put(qry / "q_not_an_image.png", b"\x89PNG\r\n\x1a\n garbage")
    return root


def file_listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_size for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory, converted_weights):
    tmp = tmp_path_factory.mktemp("messy")
    data, outside, out = build_messy(tmp / "data", tmp / "outside"), tmp / "outside", tmp / "out"
    put(outside / "victim.json", b"must stay")
    out.mkdir()
    (out / "rankings.json").symlink_to(outside / "victim.json")  # must be replaced, not written through
    cache = new_cache(tmp / "cache", converted_weights)
    before = {"data": file_listing(data), "outside": file_listing(outside)}
    argv = ["--data", str(data), "--cache", str(cache), "--output", str(out), "--top-k", "3", "--expand-to", "6",
            "--workers", "1", "--report", "9"]
    with collected_logs() as log:
        start = time.perf_counter()
        code = cli_main(argv)
        seconds = time.perf_counter() - start
    return {"data": data, "outside": outside, "out": out, "cache": cache, "argv": argv, "code": code,
            "log": log, "before": before, "seconds": seconds}


def test_messy_run_succeeds_and_ranks_everything(messy_run):
    from stages.common.dataset import load_dataset

    assert messy_run["code"] == 0
    dataset = load_dataset(messy_run["data"])
    assert len(dataset.references) == 21 and len(dataset.queries) == 9  # folder, notes, hidden file left out
    rankings = json.loads((messy_run["out"] / "rankings.json").read_text())
    assert list(rankings) == list(dataset.queries)
    for ranked in rankings.values():
        assert len(ranked) == len(set(ranked)) == len(dataset.references)
        assert set(ranked) == set(dataset.references)
    nsml = json.loads((messy_run["out"] / "nsml_results.json").read_text())
    assert {q: refs for _, (q, refs) in nsml} == rankings


def test_unreadable_references_last_and_queries_in_name_order(messy_run):
    from stages.common.dataset import load_dataset

    refs = list(load_dataset(messy_run["data"]).references)
    rankings = json.loads((messy_run["out"] / "rankings.json").read_text())
    bad = sorted(UNREADABLE_REFS)
    for query, ranked in rankings.items():
        if query in UNREADABLE_QUERIES:
            assert ranked == refs
        else:
            assert ranked[-len(bad):] == bad, query


def test_skipped_json_lists_each_unreadable_file_with_its_reason(messy_run):
    skipped = json.loads((messy_run["out"] / "skipped.json").read_text())
    assert set(skipped["references"]) == set(UNREADABLE_REFS)
    assert set(skipped["queries"]) == set(UNREADABLE_QUERIES)
    for kind, expected in (("references", UNREADABLE_REFS), ("queries", UNREADABLE_QUERIES)):
        for name, reason in expected.items():
            assert reason in skipped[kind][name]


def test_one_log_line_per_unreadable_file(messy_run):
    folders = {"references": messy_run["data"] / REFERENCE, "queries": messy_run["data"] / QUERY}
    files = [p for p in folders["references"].iterdir() if p.stem in UNREADABLE_REFS]
    files += [p for p in folders["queries"].iterdir() if p.stem in UNREADABLE_QUERIES]
    assert len(files) == len(UNREADABLE_REFS) + len(UNREADABLE_QUERIES)
    for path in files:
        lines = [line for line in messy_run["log"] if str(path) in line]
        assert len(lines) == 1, (path, lines)
        assert "unreadable" in lines[0]


def test_odd_but_readable_images_find_their_match(messy_run):
    """Each query's own reference comes first: EXIF rotation, alpha, upper case, non-ASCII
    and foreign-byte names and a symlink outside the data folder all reach the model."""
    rankings = json.loads((messy_run["out"] / "rankings.json").read_text())
    assert {q: rankings[q][0] for q in MATCHES} == MATCHES


def test_nothing_written_outside_cache_and_output(messy_run):
    assert file_listing(messy_run["data"]) == messy_run["before"]["data"]
    assert file_listing(messy_run["outside"]) == messy_run["before"]["outside"]
    assert (messy_run["outside"] / "victim.json").read_bytes() == b"must stay"
    out = messy_run["out"]
    assert not (out / "rankings.json").is_symlink()
    assert {p.name for p in out.iterdir()} == {
        "config.json", "global_ranking.npz", "nsml_results.json", "pairs-global-top3.txt", "rankings.json",
        "skipped.json", "verification_stats.json", "reference_descriptors.npz", "report.html", "report_files"} | {
        p.name for p in out.glob("pairs-global-top3-window*.txt")}
    cache = messy_run["cache"]
    for path in cache.rglob("*"):
        assert not path.is_symlink() and path.resolve().is_relative_to(cache.resolve())
        assert not path.name.startswith(".tmp-")
    for store in [p for stage in ("global", "local", "rerank") for p in (cache / stage).iterdir()]:
        assert {p.suffix for p in store.iterdir() if p.is_file()} <= {".npz", ".json", ".lock"}


def test_messy_report_shows_every_query(messy_run):
    """`--report 9` without ground truth: all 9 queries (names with any characters), every
    link relative and on disk, the unreadable queries and references as placeholders."""
    from tests.test_report import Page

    text = (messy_run["out"] / "report.html").read_text()
    page = Page(text)
    assert len(page.rows) == 9 and len({r["query"] for r in page.rows}) == 9
    assert {"q_カフェ", "q plain", "q_empty"} <= {r["query"] for r in page.rows}
    assert page.images and all((messy_run["out"] / src).is_file() and src.startswith("report_files/")
                               for src in page.images)
    assert text.count('class="missing">unreadable<') >= 2  # q_empty, q_not_an_image
    assert "images could not be read for the report" in text


def test_messy_rerun_reuses_everything(messy_run, log_lines, monkeypatch):
    from stages.global_embed import extract as g
    from stages.local_delf import extract as loc

    calls = []
    for module in (g, loc):
        original = module.describe
        monkeypatch.setattr(module, "describe", lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
    before = (messy_run["out"] / "rankings.json").read_bytes()
    assert cli_main(messy_run["argv"]) == 0
    assert calls == []
    assert (messy_run["out"] / "rankings.json").read_bytes() == before
    # The verdicts come from the cache and are logged again, once each; the broken link is retried.
    for name in UNREADABLE_REFS:
        assert sum(f"reference/{name}." in line for line in log_lines) == 1, name


def test_layout_errors_exit_2_with_a_clear_message(tmp_path, log_lines):
    (tmp_path / "a" / QUERY).mkdir(parents=True)
    assert cli_main(["--data", str(tmp_path / "a"), "--output", str(tmp_path / "o")]) == 2
    assert any("missing folder test/test_data/reference" in line for line in log_lines)
    put(tmp_path / "b" / QUERY / "q.jpg", encode(photo("coffee")))
    put(tmp_path / "b" / REFERENCE / "notes.txt", b"x")
    assert cli_main(["--data", str(tmp_path / "b"), "--output", str(tmp_path / "o")]) == 2
    assert any("no reference images" in line for line in log_lines)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_or_cache_exits_2_naming_the_folder(tmp_path, log_lines):
    """A folder below a regular file cannot be created, even by root (unlike a chmod)."""
    put(tmp_path / "d" / QUERY / "q.jpg", encode(photo("coffee")))
    put(tmp_path / "d" / REFERENCE / "r.jpg", encode(photo("coffee")))
    put(tmp_path / "file", b"x")
    blocked = tmp_path / "file" / "out"
    assert cli_main(["--data", str(tmp_path / "d"), "--output", str(blocked)]) == 2
    assert any(f"--output {blocked}: cannot write there (Not a directory)" in line for line in log_lines)
    assert cli_main(["--data", str(tmp_path / "d"), "--output", str(tmp_path / "o"), "--cache", str(blocked)]) == 2
    assert any(f"--cache {blocked}: cannot write there" in line for line in log_lines)
    assert not (tmp_path / "o").exists()


def test_run_pipeline_prints_no_traceback_for_a_layout_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--data", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "expected layout" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_exit_code_1_when_no_query_is_readable(tmp_path, converted_weights, log_lines):
    data = tmp_path / "data"
    put(data / QUERY / "q.jpg", b"")
    put(data / REFERENCE / "r1.jpg", encode(photo("coffee")))
    put(data / REFERENCE / "r2.png", encode(photo("chelsea"), ".png"))
    argv = ["--data", str(data), "--cache", str(new_cache(tmp_path / "c", converted_weights)),
            "--output", str(tmp_path / "o")]
    assert cli_main(argv) == 1
    assert any("no query image could be read" in line for line in log_lines)
    assert json.loads((tmp_path / "o" / "rankings.json").read_text()) == {"q": ["r1", "r2"]}


# ---------------------------------------------------------------- interrupted and concurrent runs

def build_small(root: Path) -> Path:
    """Six references and four queries, tiny, plus one unreadable file on each side."""
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry"]):
        rgb = photo(name, (96, 72) if i % 2 else (72, 96))
        put(root / REFERENCE / f"ref {i} ü.jpg", encode(rgb))
        if i < 4:
            put(root / QUERY / f"q{i}.jpg", encode(view(rgb, 6 - 3 * i)))
    put(root / REFERENCE / "broken.jpg", b"")
    put(root / QUERY / "q_bad.jpg", b"not an image")
    return root


def pipeline_command(data: Path, cache: Path, out: Path) -> list[str]:
    # expand_below far above any inlier count: every query gets every window verified,
    # so the run goes global -> local -> rerank -> local (window 2) -> rerank -> ...
    return [sys.executable, str(ROOT / "run_pipeline.py"), "--data", str(data), "--cache", str(cache),
            "--output", str(out), "--top-k", "2", "--expand-to", "6", "--expand-below", "1", "--workers", "2"]


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        assert proc.wait(timeout) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """Ends what is left of the run's process group (e.g. joblib workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def entries(cache: Path, stage: str) -> list[Path]:
    return [p for p in cache.glob(f"{stage}/*/*.npz") if not p.name.startswith(".") and p.name != "pca.npz"]


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory, converted_weights):
    """An uninterrupted subprocess run of the small set in its own cache."""
    tmp = tmp_path_factory.mktemp("small")
    data = build_small(tmp / "data")
    out, log = tmp / "out", tmp / "reference.log"
    start_time = time.perf_counter()
    finish(start(pipeline_command(data, new_cache(tmp / "cache", converted_weights), out), log), log)
    return {"data": data, "rankings": (out / "rankings.json").read_bytes(), "tmp": tmp,
            "seconds": time.perf_counter() - start_time}


def test_small_reference_run(small_reference):
    rankings = json.loads(small_reference["rankings"])
    assert len(rankings) == 5 and all(r[-1] == "broken" for q, r in rankings.items() if q != "q_bad")
    assert {q: r[0] for q, r in rankings.items() if q != "q_bad"} == {f"q{i}": f"ref {i} ü" for i in range(4)}


def test_killed_runs_resume_to_identical_rankings(small_reference, converted_weights, tmp_path):
    """SIGKILL during global extraction, during local extraction and after the first
    inlier counts are cached; the fourth run finishes and matches the uninterrupted run.
    About a minute on 2 cores (four TensorFlow process starts)."""
    cache = new_cache(tmp_path / "cache", converted_weights)
    out, log = tmp_path / "out", tmp_path / "runs.log"
    command = pipeline_command(small_reference["data"], cache, out)
    kill_points = [("global", 3), ("local", 1), ("rerank", 1)]
    for stage, count in kill_points:
        proc = start(command, log)
        try:
            deadline = time.monotonic() + 240
            while len(entries(cache, stage)) < count:
                assert proc.poll() is None, f"the run ended before {count} {stage} entries were written"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
            proc.wait(30)
        finally:
            kill_group(proc)
        for entry in [p for s in ("global", "local", "rerank") for p in entries(cache, s)]:
            load_npz(entry)  # every entry a killed run left is complete
    assert not (out / "rankings.json").exists()
    finish(start(command, log), log)
    assert (out / "rankings.json").read_bytes() == small_reference["rankings"]


def test_concurrent_runs_share_a_cache_safely(small_reference, converted_weights, tmp_path):
    cache = new_cache(tmp_path / "cache", converted_weights)
    runs = [(tmp_path / f"out{i}", tmp_path / f"run{i}.log") for i in range(2)]
    procs = [start(pipeline_command(small_reference["data"], cache, out), log) for out, log in runs]
    for proc, (_, log) in zip(procs, runs, strict=True):
        finish(proc, log)
    for out, _ in runs:
        assert (out / "rankings.json").read_bytes() == small_reference["rankings"]
    assert not [p for p in cache.rglob(".tmp-*")]
    for entry in [p for s in ("global", "local", "rerank") for p in entries(cache, s)]:
        load_npz(entry)
    with exclusive_lock(next(cache.glob("local/*/pca.lock"))):
        pass  # released
