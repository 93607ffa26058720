"""examples/corruptions.py: CIFAR-10-C-style corruptions with the published CIFAR constants, seeded."""

import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import corruptions  # noqa: E402
from corruptions import CONSTANTS, CORRUPTIONS, SEVERITIES, corrupt, corruption_seed, parse_severities, parse_shift  # noqa: E402

NAMES = list(CORRUPTIONS)
NOISY = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"]
REQUIRED = ["gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness", "jpeg_compression", "pixelate"]


def smooth_images(n=16, size=32, seed=0, lo=0.15, hi=0.85):
    """Random smooth uint8 images (bilinear upsampling of 8x8 noise), values in [lo, hi] * 255."""
    g = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g, device="cpu")
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return ((lo + (hi - lo) * fine) * 255).round().to(torch.uint8)


def grey(n=64, size=32, level=128):
    return torch.full((n, 3, size, size), level, dtype=torch.uint8, device="cpu")


def change(a, b):
    return (a.double() - b.double()).abs().mean().item()


def test_published_cifar_constants_and_names():
    assert set(REQUIRED) <= set(CORRUPTIONS)
    assert SEVERITIES == (1, 2, 3, 4, 5)
    # make_cifar_c.py (CIFAR version; the ImageNet version has e.g. gaussian_noise .08 .. .38)
    assert CONSTANTS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert CONSTANTS["shot_noise"] == (500, 250, 100, 75, 50)
    assert CONSTANTS["impulse_noise"] == (0.01, 0.02, 0.03, 0.05, 0.07)
    assert CONSTANTS["gaussian_blur"] == (0.4, 0.6, 0.7, 0.8, 1.0)
    assert CONSTANTS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert CONSTANTS["brightness"] == (0.05, 0.1, 0.15, 0.2, 0.3)
    assert CONSTANTS["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert CONSTANTS["pixelate"] == (0.95, 0.9, 0.85, 0.75, 0.65)
    for name, fn in CORRUPTIONS.items():
        assert fn.__name__ == name and len(CONSTANTS[name]) == 5 and fn.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_device_kept_at_every_severity(name):
    for shape in ((3, 3, 32, 32), (2, 3, 20, 24)):
        x = smooth_images(shape[0], 32)[:, :, : shape[2], : shape[3]].contiguous()
        for s in SEVERITIES:
            y = corrupt(x, name, s, generator=s)
            assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert corrupt(x[:0], name, 1, generator=0).shape == (0,) + x.shape[1:]


@pytest.mark.parametrize("bad", [0, 6, -1, 2.0, True, None, "3"])
def test_bad_severity_is_refused_naming_the_argument(bad):
    x = grey(2, 8)
    for name in ("gaussian_noise", "pixelate", "jpeg_compression"):
        with pytest.raises(ValueError, match=r"^severity must be one of 1, 2, 3, 4, 5, got"):
            corrupt(x, name, bad)


def test_bad_images_and_generator_are_refused():
    with pytest.raises(ValueError, match=r"x must be a uint8 tensor"):
        corrupt(torch.zeros(2, 3, 8, 8, device="cpu"), "contrast", 1)
    with pytest.raises(ValueError, match=r"x must be a uint8 tensor"):
        corrupt(torch.zeros(3, 8, 8, dtype=torch.uint8, device="cpu"), "contrast", 1)
    with pytest.raises(ValueError, match=r"generator must be"):
        corrupt(grey(1, 8), "gaussian_noise", 1, generator="seed")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "saturate"])
def test_strength_grows_with_severity(name):
    """Mean absolute change from the clean image increases from severity 1 to 5.

    Random smooth images, except for ``pixelate``: on images smooth at a 4-pixel scale its
    change depends on how the 32 -> 28, 27, 24 box grids line up with the image's structure
    and is not monotone between severities 2 and 4, so it gets independent random pixels,
    where the change grows with the lost resolution. ``saturate`` is left out: its published
    constants first desaturate (by 70 %, then 90 %), then oversaturate, so its change is not
    monotone by design.
    """
    if name == "pixelate":
        g = torch.Generator("cpu").manual_seed(0)
        x = torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8, device="cpu")
    else:
        x = smooth_images(32)
    changes = [change(corrupt(x, name, s, generator=0), x) for s in SEVERITIES]
    assert all(a < b for a, b in zip(changes, changes[1:])), changes
    assert changes[0] > 0


@pytest.mark.parametrize("s", SEVERITIES)
def test_gaussian_noise_std_matches_the_published_sigma(s):
    sigma = CONSTANTS["gaussian_noise"][s - 1]
    x = grey(64)  # mid-grey: 0.502 is over 5 sigma from 0 and 1, so clipping is negligible
    d = (corrupt(x, "gaussian_noise", s, generator=10 + s).double() - x.double()) / 255
    n = d.numel()
    # rounding to grey levels adds uniform noise of variance 1 / (12 * 255^2)
    expected = math.sqrt(sigma**2 + 1 / (12 * 255**2))
    se_std = expected / math.sqrt(2 * n)  # standard error of a Gaussian sample std
    assert abs(d.std().item() - expected) < 5 * se_std
    assert abs(d.mean().item()) < 5 * expected / math.sqrt(n)


@pytest.mark.parametrize("s", SEVERITIES)
def test_shot_noise_matches_the_poisson_law(s):
    """Mean and std of ``round(255 * Poisson(lam v) / lam)`` against their exact values from the Poisson pmf."""
    lam = CONSTANTS["shot_noise"][s - 1]
    x = grey(64)
    v = torch.tensor(128 / 255, dtype=torch.float32).item()
    y = corrupt(x, "shot_noise", s, generator=s).double()
    k = torch.arange(0, 3 * lam + 50, dtype=torch.float64, device="cpu")
    pmf = torch.distributions.Poisson(torch.tensor(lam * v, dtype=torch.float64, device="cpu")).log_prob(k).exp()
    levels = (k / lam).clamp(0, 1).mul(255).round()
    mean = (pmf * levels).sum().item()
    std = math.sqrt((pmf * (levels - mean) ** 2).sum().item())
    assert std == pytest.approx(255 * math.sqrt(v / lam), rel=0.05)  # Var(Poisson(lam v) / lam) = v / lam
    n = y.numel()
    assert abs(y.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(y.std().item() - std) < 5 * std / math.sqrt(2 * n)  # SE of a std; Poisson(>= 25) is near normal


@pytest.mark.parametrize("s", SEVERITIES)
def test_impulse_noise_is_salt_and_pepper_at_the_published_amount(s):
    amount = CONSTANTS["impulse_noise"][s - 1]
    x = grey(64)
    y = corrupt(x, "impulse_noise", s, generator=s)
    n = y.numel()
    salt, pepper = (y == 255).double().mean().item(), (y == 0).double().mean().item()
    assert ((y == 255) | (y == 0) | (y == 128)).all()
    tol = 5 * math.sqrt(amount / 2 * (1 - amount / 2) / n)
    assert abs(salt - amount / 2) < tol and abs(pepper - amount / 2) < tol


@pytest.mark.parametrize("s", SEVERITIES)
def test_contrast_keeps_the_mean_and_scales_deviations(s):
    c = CONSTANTS["contrast"][s - 1]
    x = smooth_images(8, lo=0.0, hi=1.0)
    y = corrupt(x, "contrast", s).double()
    xm = x.double().mean(dim=(2, 3), keepdim=True)
    ym = y.mean(dim=(2, 3), keepdim=True)
    assert (ym - xm).abs().max() < 0.51  # mean of each image's channel kept (rounding aside)
    expected = xm + c * (x.double() - xm)
    assert (y - expected).abs().max() <= 0.5 + 1e-4  # deviations scaled by c, then rounded


def _pixel_groups(size, small):
    """For each output index, the low-resolution pixel it copies (Pillow's BOX upsampling is nearest)."""
    return [int((i + 0.5) * small / size) for i in range(size)]


@pytest.mark.parametrize("s", SEVERITIES)
def test_pixelate_gives_constant_blocks(s):
    c = CONSTANTS["pixelate"][s - 1]
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.uint8, device="cpu")
    y = corrupt(x, "pixelate", s)
    small = int(32 * c)
    groups = torch.tensor(_pixel_groups(32, small))
    assert len(set(groups.tolist())) == small
    first = torch.tensor([groups.tolist().index(g) for g in groups.tolist()])  # first output index of each block
    assert torch.equal(y, y[:, :, first][:, :, :, first])  # every pixel equals its block's first pixel
    # as many distinct blocks as low-resolution pixels: no more than small x small values per channel
    assert all(len(torch.unique(y[i, 0])) <= small * small for i in range(4))


@pytest.mark.parametrize("s", SEVERITIES)
def test_pixelate_matches_pillow_box_resize(s):
    np = pytest.importorskip("numpy")
    from PIL import Image

    c = CONSTANTS["pixelate"][s - 1]
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.uint8, device="cpu")
    n = int(32 * c)
    ref = []
    for img in x:
        im = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((n, n), Image.BOX).resize((32, 32), Image.BOX)
        ref.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
    assert torch.equal(corrupt(x, "pixelate", s), torch.stack(ref))


def test_jpeg_changes_the_image_and_quality_falls_with_severity():
    x = smooth_images(16)
    errors = []
    for s in SEVERITIES:
        y = corrupt(x, "jpeg_compression", s)
        assert not torch.equal(y, x)
        errors.append(change(y, x))
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


def test_jpeg_pillow_fallback_is_identical(monkeypatch):
    x = smooth_images(4)
    fast = [corrupt(x, "jpeg_compression", s) for s in SEVERITIES]

    def gone(chunk, quality):
        raise ImportError("no torchvision image codecs")

    monkeypatch.setattr(corruptions, "_jpeg_torchvision", gone)
    slow = [corrupt(x, "jpeg_compression", s) for s in SEVERITIES]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    import numpy as np

    x = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator("cpu").manual_seed(0), dtype=torch.uint8, device="cpu")
    for s in SEVERITIES:
        sigma = CONSTANTS["gaussian_blur"][s - 1]
        v = x.double().numpy() / 255
        ref = [ndimage.gaussian_filter(img, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0) for img in v]
        ref = (torch.from_numpy(np.stack(ref)).clamp(0, 1) * 255).round()
        assert (corrupt(x, "gaussian_blur", s).double() - ref).abs().max() <= 1  # float32 vs float64 rounding
    flat = grey(2, 16, level=90)
    assert torch.equal(corrupt(flat, "gaussian_blur", 5), flat)  # a normalised kernel keeps constants


def test_hsv_round_trip_and_reference():
    g = torch.Generator("cpu").manual_seed(0)
    rgb = torch.rand(4, 3, 9, 9, generator=g, device="cpu")
    rgb[0, :, 0, 0] = 0.0  # black
    rgb[0, :, 0, 1] = 0.5  # grey
    rgb[0, :, 0, 2] = torch.tensor([0.7, 0.7, 0.2])  # ties between maxima
    hsv = corruptions.rgb_to_hsv(rgb)
    assert hsv.min() >= 0 and hsv.max() <= 1
    assert torch.allclose(corruptions.hsv_to_rgb(hsv), rgb, atol=1e-6)
    colors = pytest.importorskip("matplotlib.colors")
    ref = torch.from_numpy(colors.rgb_to_hsv(rgb.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    assert torch.allclose(hsv, ref, atol=1e-6)


def test_brightness_raises_the_hsv_value_only():
    x = smooth_images(8)
    for s in SEVERITIES:
        c = CONSTANTS["brightness"][s - 1]
        y = corrupt(x, "brightness", s)
        hx = corruptions.rgb_to_hsv(x.float() / 255)
        hy = corruptions.rgb_to_hsv(y.float() / 255)
        assert (hy[:, 2] - (hx[:, 2] + c).clamp(max=1)).abs().max() <= 0.5 / 255 + 1e-6
        assert (y.int() >= x.int()).all()  # brighter everywhere


@pytest.mark.parametrize("name", NAMES)
def test_seeds_reproduce_bit_for_bit(name):
    x = smooth_images(4)
    a = corrupt(x, name, 3, generator=123)
    b = corrupt(x, name, 3, generator=123)
    c = corrupt(x, name, 3, generator=torch.Generator("cpu").manual_seed(123))
    assert torch.equal(a, b) and torch.equal(a, c)
    if name in NOISY:
        assert not torch.equal(a, corrupt(x, name, 3, generator=124))


def test_chunking_does_not_change_deterministic_corruptions(monkeypatch):
    x = smooth_images(10)
    whole = {n: corrupt(x, n, 4) for n in NAMES if n not in NOISY}
    monkeypatch.setattr(corruptions, "CHUNK_VALUES", 3 * 32 * 32 * 3)  # 3 images a chunk, a ragged last one
    for n, y in whole.items():
        assert torch.equal(corrupt(x, n, 4), y), n


def test_default_device_gives_the_same_images():
    """With PYRO_SSVI_TEST_DEVICE=cuda this checks the GPU path against the CPU one."""
    dev = torch.empty(0).device
    x = smooth_images(4)
    for name in NAMES:
        a = corrupt(x, name, 5, generator=7)
        b = corrupt(x.to(dev), name, 5, generator=7)
        assert b.device == dev
        assert (a.int() - b.cpu().int()).abs().max() <= 1, name  # noise drawn on the CPU either way


def test_unknown_corruption_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'; known: gaussian_noise, shot_noise"):
        corrupt(grey(1, 8), "fog", 1)
    with pytest.raises(ValueError, match=r"unknown corruption 'gausian_noise'.*pixelate.*'all'"):
        parse_shift("contrast,gausian_noise")
    with pytest.raises(ValueError, match=r"no corruption named"):
        parse_shift(" , ")


def test_parse_shift():
    assert parse_shift("all") == NAMES
    assert parse_shift(" contrast , pixelate,contrast") == ["contrast", "pixelate"]
    assert parse_shift("pixelate,all") == ["pixelate"] + [n for n in NAMES if n != "pixelate"]


def test_parse_severities():
    assert parse_severities("5, 3,5") == (3, 5) and parse_severities("1,2,3,4,5") == SEVERITIES
    for bad in ("0", "6", "3.5", "x", "-1"):
        with pytest.raises(ValueError, match=rf"severity must be one of 1, 2, 3, 4, 5, got '{bad}'"):
            parse_severities(f"3,{bad}")
    with pytest.raises(ValueError, match="no severity named"):
        parse_severities(" , ")


def test_corruption_seed_is_distinct_and_stable():
    seeds = {corruption_seed(0, n, s) for n in NAMES for s in SEVERITIES}
    assert len(seeds) == len(NAMES) * len(SEVERITIES)
    assert corruption_seed(1, "contrast", 2) == corruption_seed(1, "contrast", 2) != corruption_seed(2, "contrast", 2)
    assert all(0 <= s < 2**63 for s in seeds)
