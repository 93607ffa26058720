"""examples/folder_data.py: image folders (PNG and JPEG made here in tmp_path) as uint8 tensors, with a cache."""

import os
import pathlib
import shutil
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import folder_data  # noqa: E402
from folder_data import FolderDataError, channel_stats, load_image_folder, load_images  # noqa: E402


def _pixels(seed, size=(8, 8)):
    """A random RGB image as an (H, W, 3) uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _save(path, arr, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


def make_folder(root, classes=("cat", "dog", "emu"), n_train=3, n_test=2, size=(8, 8)):
    """``root/{train,test}/<class>/`` with lossless PNG images; returns {relative path: (H, W, 3) pixels}."""
    pixels = {}
    seed = 0
    for part, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                arr = _pixels(seed, size)
                seed += 1
                rel = f"{part}/{c}/{i:04d}.png"
                _save(root / rel, arr)
                pixels[rel] = arr
    return pixels


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_png_folder_decodes_exactly_with_sorted_classes(tmp_path, cache):
    root = tmp_path / "data"
    pixels = make_folder(root, classes=("zebra", "ant", "moth"))
    ds = load_image_folder(root, cache_dir=cache, progress=False)
    assert ds.classes == ("ant", "moth", "zebra")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (9, 3, 8, 8)
    assert ds.x_test.shape == (6, 3, 8, 8)
    assert ds.y_train.dtype == torch.long and ds.y_train.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert ds.y_test.tolist() == [0] * 2 + [1] * 2 + [2] * 2
    # sorted file order within a class; PNG is lossless, so the pixels come back exactly
    expected = torch.from_numpy(pixels["train/moth/0002.png"]).permute(2, 0, 1)
    assert torch.equal(ds.x_train[5], expected)
    expected = torch.from_numpy(pixels["test/zebra/0000.png"]).permute(2, 0, 1)
    assert torch.equal(ds.x_test[4], expected)


def test_jpeg_grey_rgba_mixed_extensions_and_ignored_files(tmp_path, cache):
    root = tmp_path / "data"
    arr = _pixels(1, (8, 8))
    _save(root / "train/a/0.JPG", arr)  # upper-case extension
    _save(root / "train/a/1.jpeg", arr)
    _save(root / "train/a/nested/2.png", arr, mode="L")  # grey, in a nested folder
    _save(root / "train/b/0.png", arr, mode="RGBA")
    _save(root / "train/b/.hidden.png", arr)  # hidden: ignored
    (root / "train/b/notes.txt").write_text("not an image")  # other file: ignored
    _save(root / "train/.cache/0.png", arr)  # hidden folder: not a class
    _save(root / "test/b/0.jpg", arr)
    ds = load_image_folder(root, cache_dir=cache, progress=False)
    assert ds.classes == ("a", "b")
    assert ds.x_train.shape == (4, 3, 8, 8) and ds.y_train.tolist() == [0, 0, 0, 1]
    assert ds.y_test.tolist() == [1]
    grey = ds.x_train[2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey -> three equal channels
    assert torch.equal(ds.x_train[3], torch.from_numpy(arr).permute(2, 0, 1))  # RGBA -> RGB, alpha dropped
    jpeg_err = (ds.x_train[0].int() - torch.from_numpy(arr).permute(2, 0, 1).int()).abs().float().mean()
    assert 0 < jpeg_err < 60  # lossy but the same picture


def test_pillow_fallback_gives_the_same_pixels(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    make_folder(root, n_train=1, n_test=1)
    _save(root / "train/cat/1.jpg", _pixels(3))
    _save(root / "train/dog/1.png", _pixels(4), mode="L")
    fast = load_image_folder(root, cache_dir=cache / "a", progress=False)

    def gone(data):
        raise AttributeError("torchvision.io has no decode_image")

    monkeypatch.setattr(folder_data, "_decode_torchvision", gone)
    slow = load_image_folder(root, cache_dir=cache / "b", progress=False)
    assert torch.equal(fast.x_train, slow.x_train) and torch.equal(fast.x_test, slow.x_test)


def test_test_set_may_lack_classes_labels_follow_training(tmp_path, cache):
    root = tmp_path / "data"
    for c in ("a", "b", "c"):
        _save(root / f"train/{c}/0.png", _pixels(0))
    _save(root / "test/c/0.png", _pixels(1))
    ds = load_image_folder(root, cache_dir=cache, progress=False)
    assert ds.y_test.tolist() == [2]


def test_cache_is_reused_then_rebuilt_when_the_folder_changes(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    make_folder(root)
    first = load_image_folder(root, cache_dir=cache, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt" and not any(p.suffix == ".pt" for p in root.rglob("*"))

    calls = []
    real = folder_data._decode
    monkeypatch.setattr(folder_data, "_decode", lambda p: calls.append(p) or real(p))
    again = load_image_folder(root, cache_dir=cache, progress=False)
    assert calls == []  # served from the cache
    for a, b in zip(first, again):
        assert a == b if isinstance(a, tuple) else torch.equal(a, b)

    # a new file: new fingerprint, decoded again
    _save(root / "train/cat/0099.png", _pixels(99))
    grown = load_image_folder(root, cache_dir=cache, progress=False)
    assert len(calls) == 16 and grown.x_train.shape[0] == 10
    assert len(list(cache.iterdir())) == 1  # the stale cache file of the old folder state is removed

    # same name and size, new content and mtime: decoded again
    calls.clear()
    target = root / "train/dog/0000.png"
    _save(target, _pixels(1234))
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_image_folder(root, cache_dir=cache, progress=False)
    assert len(calls) == 16
    assert torch.equal(changed.x_train[4], torch.from_numpy(_pixels(1234)).permute(2, 0, 1))

    # image_size is part of the fingerprint
    calls.clear()
    small = load_image_folder(root, image_size=4, cache_dir=cache, progress=False)
    assert len(calls) == 16 and small.x_train.shape[-2:] == (4, 4)
    assert len(list(cache.iterdir())) == 2  # one per image_size
    calls.clear()
    load_image_folder(root, cache_dir=cache, progress=False)
    load_image_folder(root, image_size=4, cache_dir=cache, progress=False)
    assert calls == []


def test_corrupt_or_foreign_cache_file_is_rebuilt(tmp_path, cache):
    root = tmp_path / "data"
    make_folder(root)
    good = load_image_folder(root, cache_dir=cache, progress=False)
    (path,) = cache.iterdir()
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(again.x_train, good.x_train)
    # a readable file with the wrong fingerprint inside is not trusted either
    torch.save({"version": folder_data.CACHE_VERSION, "fingerprint": "0" * 64, "x_train": torch.zeros(1, 3, 8, 8, dtype=torch.uint8)}, path)
    with pytest.warns(UserWarning, match="stale or foreign"):
        again = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(again.x_train, good.x_train)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["x_train"], good.x_train)  # rewritten


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert folder_data.default_cache_dir() == str(tmp_path / "xdg" / "pyro_ssvi")
    root = tmp_path / "data"
    make_folder(root, n_train=1, n_test=1)
    load_image_folder(root, progress=False)
    assert len(list((tmp_path / "xdg" / "pyro_ssvi").glob("folder-data-*.pt"))) == 1
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert folder_data.default_cache_dir() == str(tmp_path / "home" / ".cache" / "pyro_ssvi")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_data_folder(tmp_path, cache):
    root = tmp_path / "data"
    make_folder(root, n_train=1, n_test=1)
    dirs = [p for p in root.rglob("*") if p.is_dir()] + [root]
    for d in dirs:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        ds = load_image_folder(root, cache_dir=cache, progress=False)
        assert ds.x_train.shape[0] == 3
    finally:
        for d in dirs:
            d.chmod(stat.S_IRWXU)


def test_read_only_data_folder_by_mtime(tmp_path, cache):
    """Loading never writes into the data folder (checked by its tree's listing and mtimes; root can write anywhere)."""
    root = tmp_path / "data"
    make_folder(root, n_train=1, n_test=1)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) + [("root", root.stat().st_mtime_ns)]
    load_image_folder(root, cache_dir=cache, progress=False)
    load_image_folder(root, cache_dir=cache, progress=False)
    after = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) + [("root", root.stat().st_mtime_ns)]
    assert before == after


def test_cache_dir_inside_the_data_folder_is_refused(tmp_path):
    root = tmp_path / "data"
    make_folder(root, n_train=1, n_test=1)
    with pytest.raises(FolderDataError, match="cache_dir .* is inside the data folder"):
        load_image_folder(root, cache_dir=root / "cache", progress=False)


def test_mixed_sizes_name_the_file_unless_resized(tmp_path, cache):
    root = tmp_path / "data"
    make_folder(root, n_train=2, n_test=1, size=(8, 8))
    _save(root / "train/dog/0001.png", _pixels(7, size=(12, 10)))  # width 12, height 10
    with pytest.raises(FolderDataError) as e:
        load_image_folder(root, cache_dir=cache, progress=False)
    msg = str(e.value)
    assert "train/dog/0001.png" in msg and "12x10" in msg and "8x8" in msg and "image_size" in msg and "\n" not in msg
    ds = load_image_folder(root, image_size=6, cache_dir=cache, progress=False)
    assert ds.x_train.shape == (6, 3, 6, 6) and ds.x_test.shape == (3, 3, 6, 6)
    # antialiased resize of a constant image stays constant
    _save(root / "test/emu/0000.png", np.full((16, 16, 3), 77, dtype=np.uint8))
    ds = load_image_folder(root, image_size=6, cache_dir=cache, progress=False)
    assert (ds.x_test[-1] == 77).all()


def test_test_images_of_another_size_are_refused(tmp_path, cache):
    root = tmp_path / "data"
    make_folder(root, n_train=1, n_test=1)
    _save(root / "test/emu/0000.png", _pixels(3, size=(9, 9)))
    with pytest.raises(FolderDataError, match=r"test/emu/0000\.png.* 9x9 .*8x8"):
        load_image_folder(root, cache_dir=cache, progress=False)


@pytest.mark.parametrize(
    "breakage, pattern",
    [
        (lambda root: None, r"image folder .*missing-root.* does not exist"),
        (lambda root: [make_folder(root, n_train=1, n_test=1), shutil.rmtree(root / "test")], r"test folder .* is missing"),
        (lambda root: (root / "test").mkdir(parents=True), r"training folder .* is missing"),
        (lambda root: [(root / "train").mkdir(parents=True), (root / "test").mkdir()], r"training folder .* is empty"),
        (lambda root: [make_folder(root, n_train=1, n_test=1), (root / "train" / "empty").mkdir()], r"class folder .*train/empty.* has no PNG or JPEG"),
        (lambda root: [make_folder(root, n_train=1, n_test=1), _save(root / "test/yak/0.png", _pixels(0))], r"test class 'yak'.* is not a training class"),
        (lambda root: [make_folder(root, n_train=1, n_test=1), (root / "train/cat/bad.jpg").write_bytes(b"\xff\xd8garbage")], r"image file .*train/cat/bad\.jpg.* is corrupt"),
        (lambda root: [make_folder(root, n_train=1, n_test=1), (root / "test/dog/empty.png").write_bytes(b"")], r"image file .*test/dog/empty\.png.* is empty"),
    ],
    ids=["no-folder", "no-test", "no-train", "no-classes", "empty-class", "unknown-test-class", "corrupt-image", "empty-file"],
)
def test_bad_folders_raise_one_line_folder_data_errors(tmp_path, cache, breakage, pattern):
    root = tmp_path / ("missing-root" if "missing-root" in pattern else "data")
    breakage(root)
    with pytest.raises(FolderDataError, match=pattern) as e:
        load_image_folder(root, cache_dir=cache, progress=False)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_image_size_is_checked(tmp_path, cache):
    make_folder(tmp_path / "data", n_train=1, n_test=1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(FolderDataError, match="image_size must be a positive integer"):
            load_image_folder(tmp_path / "data", image_size=bad, cache_dir=cache, progress=False)


def test_progress_bar_goes_to_stderr_and_can_be_silenced(tmp_path, cache, capsys):
    make_folder(tmp_path / "data", n_train=1, n_test=1)
    load_image_folder(tmp_path / "data", cache_dir=cache / "a", progress=True)
    assert "decoding" in capsys.readouterr().err
    load_image_folder(tmp_path / "data", cache_dir=cache / "b", progress=False)
    assert capsys.readouterr().err == ""


def test_load_images_flat_and_nested(tmp_path, cache):
    flat = tmp_path / "flat"
    for i in range(4):
        _save(flat / f"{i}.png", _pixels(i))
    x = load_images(flat, cache_dir=cache, progress=False)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8)
    assert torch.equal(x[2], torch.from_numpy(_pixels(2)).permute(2, 0, 1))
    nested = tmp_path / "nested"
    make_folder(nested, n_train=1, n_test=1)
    _save(nested / "loose.jpg", _pixels(5))
    x = load_images(nested, cache_dir=cache, progress=False)
    assert x.shape == (7, 3, 8, 8)
    again = load_images(nested, cache_dir=cache, progress=False)
    assert torch.equal(again, x)
    _save(nested / "big.png", _pixels(6, size=(16, 16)))
    with pytest.raises(FolderDataError, match=r"big\.png.*16x16"):
        load_images(nested, cache_dir=cache, progress=False)
    assert load_images(nested, image_size=4, cache_dir=cache, progress=False).shape == (8, 3, 4, 4)


def test_load_images_errors(tmp_path, cache):
    with pytest.raises(FolderDataError, match="does not exist"):
        load_images(tmp_path / "nowhere", cache_dir=cache, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FolderDataError, match="has no PNG or JPEG images"):
        load_images(tmp_path / "empty", cache_dir=cache, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG nonsense")
    with pytest.raises(FolderDataError, match=r"x\.png.* is corrupt"):
        load_images(tmp_path / "bad", cache_dir=cache, progress=False)


def test_channel_stats_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (37, 3, 5, 6), generator=g, dtype=torch.uint8, device="cpu")
    x[:, 2] //= 4  # channels differ
    mean, std = channel_stats(x, chunk=8)  # several chunks, a ragged last one
    v = x.double() / 255
    ref_mean = v.mean(dim=(0, 2, 3))
    ref_std = v.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert isinstance(mean, tuple) and len(mean) == 3 and all(isinstance(m, float) for m in mean)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref_mean, atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), ref_std, atol=1e-10)
    a, b = channel_stats(x), channel_stats(x, chunk=1)
    assert a[0] + a[1] == pytest.approx(b[0] + b[1], abs=1e-12)
    const = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8, device="cpu")
    m, s = channel_stats(const)
    assert m == pytest.approx((0.2, 0.2, 0.2)) and s == pytest.approx((0.0, 0.0, 0.0), abs=1e-7)


def test_channel_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(torch.zeros(2, 3, 4, 4, device="cpu"))
    with pytest.raises(ValueError, match="no images"):
        channel_stats(torch.zeros(0, 3, 4, 4, dtype=torch.uint8, device="cpu"))
