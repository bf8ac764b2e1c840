"""Finding, labelling and splitting images (layouts A and B), header checks and tf.data decoding."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlsweep.config._schema import DataConfig
from tlsweep.errors import DataError
from tlsweep.images._decode import check_header, image_batches
from tlsweep.images._find import SPLITS, ImageSet, find_images


def _jpeg(
    path: Path, color: tuple[int, int, int] | int = (0, 200, 0), size: int = 24, mode: str = "RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path, "JPEG", quality=95)
    return path


def _noise_jpeg(path: Path, size: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose IHDR claims ``width`` x ``height`` (1-bit grayscale)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )
    return path


def _layout_b(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            _jpeg(root / cls / f"{cls}_{i:03d}.jpg", (i % 255, 10, 10), size=8)
    return root


def _splits(images: ImageSet) -> dict[str, str]:
    return {f.path: f.split for f in images.files}


def _data_error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as e:
        find_images(cfg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- layout A ----------------------------------------------------------------------------------
def test_layout_a_on_real_photos(cats_dogs_small: Path) -> None:
    images = find_images(DataConfig(dir=cats_dogs_small))
    assert images.layout == "A"
    assert images.class_names == ["cats", "dogs"]
    expected = {
        s: {c: len(list((cats_dogs_small / s / c).iterdir())) for c in ("cats", "dogs")}
        for s in SPLITS
    }
    got: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for f in images.files:
        split, cls, name = f.path.split("/")
        assert split == f.split
        assert images.class_names[f.label] == cls
        assert (cats_dogs_small / f.path).is_file()
        assert images.abspath(f) == str(cats_dogs_small / f.path)
        got[split][cls] += 1
    assert {s: dict(got[s]) for s in SPLITS} == expected
    assert images.split_counts() == {s: sum(expected[s].values()) for s in SPLITS}
    assert images.ignored == []


def test_layout_a_test_folder_is_optional(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("validation", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _jpeg(tmp_path / split / cls / f"{i}.jpg", size=8)
    images = find_images(DataConfig(dir=tmp_path))
    assert images.layout == "A"
    assert images.split_counts() == {"train": 6, "validation": 4, "test": 0}


# --- layout B ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("vsplit", "tsplit"), [(0.2, 0.1), (0.3, 0.2), (0.25, 0.0)])
def test_layout_b_split_is_stratified(flowers_small: Path, vsplit: float, tsplit: float) -> None:
    images = find_images(DataConfig(dir=flowers_small, validation_split=vsplit, test_split=tsplit))
    assert images.layout == "B"
    assert images.class_names == sorted(p.name for p in flowers_small.iterdir())
    per = {c: Counter() for c in range(len(images.class_names))}
    for f in images.files:
        cls, _ = f.path.split("/")
        assert images.class_names[f.label] == cls
        per[f.label][f.split] += 1
    for label, counts in per.items():
        n = sum(counts.values())
        assert n == len(list((flowers_small / images.class_names[label]).iterdir()))
        assert counts["train"] > 0 and counts["validation"] > 0
        assert (counts["test"] > 0) == (tsplit > 0)
        assert abs(counts["validation"] / n - vsplit) <= 1 / n
        assert abs(counts["test"] / n - tsplit) <= 1 / n
    assert len({f.path for f in images.files}) == len(images.files)


def test_layout_b_split_depends_on_the_seed_only(flowers_small: Path) -> None:
    a = _splits(find_images(DataConfig(dir=flowers_small, seed=1)))
    b = _splits(find_images(DataConfig(dir=flowers_small, seed=1)))
    c = _splits(find_images(DataConfig(dir=flowers_small, seed=2)))
    assert a == b
    assert a.keys() == c.keys()
    assert a != c
    # and a different seed changes the split of every class, not just one
    changed = {p.split("/")[0] for p in a if a[p] != c[p]}
    assert len(changed) == len({p.split("/")[0] for p in a})


@pytest.mark.parametrize("grown", ["a_first", "c_middle", "e_last"])
def test_adding_an_image_does_not_reshuffle_other_classes(tmp_path: Path, grown: str) -> None:
    classes = {"a_first": 10, "b": 15, "c_middle": 13, "d": 14, "e_last": 16}
    root = _layout_b(tmp_path / "data", classes)
    cfg = DataConfig(dir=root, validation_split=0.25, test_split=0.2, seed=7)
    before = _splits(find_images(cfg))
    _jpeg(root / grown / "zzz_new.jpg", (1, 2, 3), size=8)
    after = _splits(find_images(cfg))
    assert set(after) - set(before) == {f"{grown}/zzz_new.jpg"}
    for path, split in before.items():
        if not path.startswith(grown + "/"):
            assert after[path] == split, f"{path} moved from {split} to {after[path]}"


def test_layout_b_too_few_images_to_split(tmp_path: Path) -> None:
    root = _layout_b(tmp_path, {"a": 10, "b": 1})
    msg = _data_error(DataConfig(dir=root, validation_split=0.2, test_split=0.1))
    assert str(root / "b") in msg and "too few" in msg


# --- unusable folders ---------------------------------------------------------------------------
def test_no_such_folder(tmp_path: Path) -> None:
    assert "no such folder" in _data_error(DataConfig(dir=tmp_path / "nope"))


def test_no_images_at_all(tmp_path: Path) -> None:
    assert "no class folders" in _data_error(DataConfig(dir=tmp_path))
    (tmp_path / "readme.txt").write_text("images go in class folders")
    assert "no class folders" in _data_error(DataConfig(dir=tmp_path))


def test_empty_class_folder(tmp_path: Path) -> None:
    root = _layout_b(tmp_path, {"cats": 5, "dogs": 5})
    (root / "birds").mkdir()
    (root / "birds" / "notes.txt").write_text("no images here")
    msg = _data_error(DataConfig(dir=root))
    assert str(root / "birds") in msg and "empty class folder" in msg


def test_single_class(tmp_path: Path) -> None:
    root = _layout_b(tmp_path, {"cats": 5})
    msg = _data_error(DataConfig(dir=root))
    assert "only one class" in msg and "cats" in msg


def test_layout_a_without_validation_folder(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _jpeg(tmp_path / split / cls / "0.jpg", size=8)
    msg = _data_error(DataConfig(dir=tmp_path))
    assert "'validation'" in msg


def test_layout_a_class_in_validation_not_in_train(tmp_path: Path) -> None:
    for split, classes in (("train", ("a", "b")), ("validation", ("a", "b", "zebra"))):
        for cls in classes:
            _jpeg(tmp_path / split / cls / "0.jpg", size=8)
    msg = _data_error(DataConfig(dir=tmp_path))
    assert "zebra" in msg and "not in train" in msg


def test_layout_a_single_class_and_empty_split_class(tmp_path: Path) -> None:
    for split in ("train", "validation"):
        _jpeg(tmp_path / split / "a" / "0.jpg", size=8)
    assert "only one class" in _data_error(DataConfig(dir=tmp_path))
    _jpeg(tmp_path / "train" / "b" / "0.jpg", size=8)
    (tmp_path / "validation" / "b").mkdir()
    msg = _data_error(DataConfig(dir=tmp_path))
    assert str(tmp_path / "validation" / "b") in msg and "empty" in msg


# --- what is listed ----------------------------------------------------------------------------
def test_hidden_files_ignored_and_non_images_reported(tmp_path: Path) -> None:
    root = _layout_b(tmp_path, {"cats": 4, "dogs": 4})
    (root / "cats" / ".DS_Store").write_bytes(b"\x00\x01")
    _jpeg(root / "cats" / "._cat_000.jpg", size=8)  # macOS resource fork
    _jpeg(root / "cats" / ".thumbs" / "t.jpg", size=8)  # hidden folder
    _jpeg(root / ".cache" / "x.jpg", size=8)  # hidden class folder
    _jpeg(root / "__MACOSX" / "y.jpg", size=8)
    (root / "dogs" / "notes.txt").write_text("labels by hand")
    (root / "dogs" / "sub").mkdir()
    _jpeg(root / "dogs" / "sub" / "nested.JPEG", size=8)  # nested and upper-case: an image
    (root / "dogs" / "sub" / "data.csv").write_text("a,b")
    images = find_images(DataConfig(dir=root, validation_split=0.25, test_split=0.0))
    assert images.class_names == ["cats", "dogs"]
    paths = {f.path for f in images.files}
    assert len(paths) == 9
    assert "dogs/sub/nested.JPEG" in paths
    assert not any("/." in "/" + p or p.startswith("__MACOSX") for p in paths)
    assert dict(images.ignored) == {
        "dogs/notes.txt": "not an image file extension",
        "dogs/sub/data.csv": "not an image file extension",
    }


# --- header checks -----------------------------------------------------------------------------
def test_check_header_accepts_real_and_unusual_images(
    tmp_path: Path, cats_dogs_small: Path
) -> None:
    real = next((cats_dogs_small / "train" / "cats").iterdir())
    assert check_header(str(real)) is None
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(rgba)
    gray = _jpeg(tmp_path / "gray.jpg", 128, mode="L")
    gif = tmp_path / "p.gif"
    Image.new("P", (10, 10), 3).save(gif)
    bmp = tmp_path / "b.bmp"
    Image.new("RGB", (10, 10), (0, 0, 255)).save(bmp)
    for p in (rgba, gray, gif, bmp):
        assert check_header(str(p)) is None, p


@pytest.mark.parametrize(
    ("make", "wanted"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not a JPEG, just text\n" * 10), "not"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 3), "not"),
        (lambda p: _png_header(p, 20000, 20000), "too large"),
        (lambda p: _png_header(p, 9000, 9000), "too large"),
        (lambda p: Image.new("RGB", (4, 4)).save(p, "TIFF"), "unsupported format TIFF"),
    ],
    ids=["zero-byte", "text", "jpeg-magic-only", "20000x20000", "9000x9000", "tiff"],
)
def test_check_header_rejects(tmp_path: Path, make, wanted: str) -> None:  # noqa: ANN001
    path = tmp_path / "bad.jpg"
    make(path)
    reason = check_header(str(path))
    assert reason is not None and wanted in reason
    assert "\n" not in reason
    assert path.stat().st_size < 10_000  # the bomb test files themselves are tiny


def test_check_header_on_a_missing_file(tmp_path: Path) -> None:
    assert check_header(str(tmp_path / "gone.jpg")) is not None


# --- decoding ----------------------------------------------------------------------------------
def test_image_batches_decode_every_format_to_rgb_and_drop_truncated(tmp_path: Path) -> None:
    files: dict[str, tuple[Path, tuple[int, int, int] | None]] = {}
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(rgba)  # fully transparent red
    files["rgba"] = (rgba, (255, 0, 0))
    files["gray"] = (_jpeg(tmp_path / "gray.jpg", 128, size=50, mode="L"), (128, 128, 128))
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["gif"] = (gif, (255, 0, 0))  # the first frame
    bmp = tmp_path / "b.bmp"
    Image.new("RGB", (70, 20), (0, 0, 255)).save(bmp)
    files["bmp"] = (bmp, (0, 0, 255))
    files["jpeg"] = (_jpeg(tmp_path / "g.jpg", (0, 200, 0), size=33), (0, 200, 0))
    full = _noise_jpeg(tmp_path / "full.jpg", size=128)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert check_header(str(trunc)) is None  # the header is fine: only decoding can tell
    files["trunc"] = (trunc, None)
    files["noise"] = (full, None)

    names = list(files)
    paths = [str(files[n][0]) for n in names]
    size = 32
    seen: dict[int, np.ndarray] = {}
    for idx, batch in image_batches(paths, size, batch_size=3):
        arr = batch.numpy()
        assert arr.dtype == np.float32
        assert arr.shape == (len(idx), size, size, 3)
        assert len(idx) <= 3
        for i, img in zip(idx, arr, strict=True):
            assert int(i) not in seen
            seen[int(i)] = img
    trunc_i = names.index("trunc")
    assert set(seen) == set(range(len(paths))) - {trunc_i}
    for i, img in seen.items():
        assert 0.0 <= img.min() and img.max() <= 255.0
        color = files[names[i]][1]
        if color is not None:
            np.testing.assert_allclose(img.mean(axis=(0, 1)), color, atol=4, err_msg=names[i])
            assert img.std(axis=(0, 1)).max() < 3, names[i]  # solid colours stay solid
    assert seen[names.index("noise")].std() > 10  # not a flat grey


# --- the header check inside the tf.data pipeline ----------------------------------------------
def _with_size(fmt: str, path: Path, width: int, height: int) -> bytes:
    """A small, valid ``fmt`` file whose header is then rewritten to claim width x height."""
    if fmt == "PNG":
        return _png_header(path, width, height).read_bytes()
    Image.new("RGB" if fmt != "GIF" else "P", (10, 10)).save(path, fmt)
    data = bytearray(path.read_bytes())
    if fmt == "GIF":
        data[6:10] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)  # a negative height is top-down
    else:  # JPEG: the start-of-frame segment holds height, then width
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_pipeline_header_guard_stops_what_check_header_stops(tmp_path: Path, fmt: str) -> None:
    import tensorflow as tf

    from tlsweep.images._decode import MAX_PIXELS, _header_guard

    def passes(data: bytes) -> bool:
        try:
            out = _header_guard(tf.constant(data))
        except tf.errors.InvalidArgumentError:
            return False
        assert out.numpy() == data  # the bytes go through untouched
        return True

    path = tmp_path / f"x.{fmt.lower()}"
    assert passes(_with_size(fmt, path, 10, 10))
    assert passes(_with_size(fmt, path, 4000, 4000))  # 16 M pixels: big, not too big
    assert not passes(_with_size(fmt, path, 9000, 9000))  # 81 M > MAX_PIXELS
    assert 9000 * 9000 > MAX_PIXELS > 4000 * 4000
    assert not passes(_with_size(fmt, path, 0, 10))
    if fmt == "BMP":
        assert passes(_with_size(fmt, path, 10, -10))
        assert not passes(_with_size(fmt, path, 9000, -9000))
    assert not passes(path.read_bytes()[:5])  # cut inside the header


def test_pipeline_header_guard_rejects_other_content(tmp_path: Path) -> None:
    import tensorflow as tf

    from tlsweep.images._decode import _header_guard

    tiff = tmp_path / "x.tiff"
    Image.new("RGB", (4, 4)).save(tiff, "TIFF")
    webp = tmp_path / "x.webp"
    Image.new("RGB", (4, 4)).save(webp, "WEBP")
    for data in (b"", b"hello, not an image", tiff.read_bytes(), webp.read_bytes()):
        with pytest.raises(tf.errors.InvalidArgumentError):
            _header_guard(tf.constant(data))


def test_image_batches_skip_a_real_bomb_and_why_skipped_says_why(tmp_path: Path) -> None:
    from tlsweep.images._decode import why_skipped

    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # a 9000x9000 image that would decode for real
    ok = _jpeg(tmp_path / "ok.jpg")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    paths = [str(bomb), str(ok), str(text), str(tmp_path / "gone.jpg")]
    got = [int(i) for idx, _ in image_batches(paths, 16, 4) for i in idx]
    assert got == [1]
    reasons = why_skipped([paths[0], paths[2], paths[3]])
    assert "too large" in reasons[0]
    assert reasons[1].startswith("not a decodable image")
    assert reasons[2].startswith("not a readable image")


def test_decoded_chunks_first_chunk_is_bigger_and_all_images_come_once(tmp_path: Path) -> None:
    from tlsweep.images._decode import decoded_chunks

    paths = [str(_noise_jpeg(tmp_path / f"{i}.jpg", size=20, seed=i)) for i in range(11)]
    paths.insert(5, str(tmp_path / "missing.jpg"))
    per_batch = 2 * 8 * 8 * 3 * 4  # batch 2 at 8 px, float32
    chunks = list(decoded_chunks(paths, 8, 2, first_bytes=3 * per_batch, chunk_bytes=per_batch))
    assert [len(c) for c in chunks] == [3, 1, 1, 1]  # 11 decodable images in batches of 2
    seen = [int(i) for c in chunks for idx, _ in c for i in idx]
    assert seen == [i for i in range(12) if i != 5]
    for c in chunks:
        for idx, x in c:
            assert x.shape == (len(idx), 8, 8, 3)


def test_decoded_chunks_first_chunk_stops_once_the_consumer_is_ready(tmp_path: Path) -> None:
    import threading

    from tlsweep.images._decode import decoded_chunks

    paths = [str(_noise_jpeg(tmp_path / f"{i}.jpg", size=20, seed=i)) for i in range(9)]
    ready = threading.Event()
    ready.set()  # the model is already built: hand over after the first batch
    chunks = list(
        decoded_chunks(paths, 8, 2, first_bytes=1 << 30, chunk_bytes=1 << 30, first_until=ready)
    )
    assert [len(c) for c in chunks] == [1, 4]
    assert [int(i) for c in chunks for idx, _ in c for i in idx] == list(range(9))


def test_read_failure_tells_io_errors_from_bad_images(tmp_path: Path) -> None:
    """What the pipeline dropped: a bad image is skipped (None); a file that cannot be read, or
    that reads and decodes now, is an I/O error with its reason."""
    from tlsweep.images._decode import read_failure

    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(_jpeg(tmp_path / "whole.jpg").read_bytes()[:200])
    assert read_failure(str(text), 16) is None
    assert read_failure(str(truncated), 16) is None
    assert (
        read_failure(str(tmp_path / "gone.jpg"), 16) == "cannot be read (No such file or directory)"
    )
    assert read_failure(str(tmp_path), 16) == "cannot be read (Is a directory)"
    assert "reads now" in read_failure(str(tmp_path / "whole.jpg"), 16)
