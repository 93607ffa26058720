"""Dataset shift: CIFAR-10-C-style corruptions of uint8 image batches, in torch.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019) corrupt the CIFAR-10 test set at five severities. This module
re-implements ten of their corruptions for uint8 batches ``(N, 3, H, W)`` with the CIFAR
severity constants of the authors' ``make_cifar_c.py`` (github.com/hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``; not the ImageNet constants of ``make_imagenet_c.py``)::

    name               constant (pixel values v in [0, 1])        severity 1 .. 5
    gaussian_noise     v + sigma * eps, eps ~ N(0, 1); sigma       .04  .06  .08  .09  .10
    shot_noise         Poisson(v * lam) / lam; lam                 500  250  100   75   50
    impulse_noise      salt & pepper, fraction of values           .01  .02  .03  .05  .07
    speckle_noise      v + v * sigma * eps; sigma                  .06  .10  .12  .16  .20
    gaussian_blur      Gaussian filter, sigma (pixels)             .4   .6   .7   .8   1.0
    contrast           (v - mean) * c + mean, per image & channel  .75  .5   .4   .3   .15
    brightness         HSV value + c                               .05  .1   .15  .2   .3
    saturate           HSV saturation * a + b; (a, b)              (.3,0) (.1,0) (1.5,0) (2,.1) (2.5,.2)
    jpeg_compression   JPEG quality                                80   65   58   50   40
    pixelate           box down to int(c * size), box back up; c   .95  .9   .85  .75  .65

As in the original, noise is drawn independently for every pixel and channel, impulse noise
sets each value to 0 or 1 (equally likely) with the given probability (scikit-image's
``s&p``), the Gaussian blur truncates its kernel at 4 sigma and repeats the edge pixels
(``skimage.filters.gaussian``'s defaults), brightness and saturation act in HSV space
(scikit-image's ``rgb2hsv``/``hsv2rgb``, re-implemented here as :func:`rgb_to_hsv` and
:func:`hsv_to_rgb`), pixelate reproduces Pillow's BOX resize (an output pixel averages the
input pixels whose centres fall in its footprint; a horizontal then a vertical pass, each
rounded to uint8), and every result is clipped to [0, 1] and stored as uint8. One deliberate difference: values are *rounded* to the nearest grey
level, where the original's ``np.uint8`` cast truncates (and so darkens by half a level on
average). JPEG goes through ``torchvision.io.encode_jpeg``/``decode_jpeg`` (libjpeg, as Pillow;
the files were byte-identical to Pillow's at all five qualities in our check), with Pillow as
the fallback once torchvision drops its deprecated image codecs. Not implemented: defocus, glass, motion
and zoom blur, snow, frost, fog, spatter and elastic (they need OpenCV, ImageMagick, SciPy or
image files).

Library or own code: ``imagecorruptions`` 1.1.2 (PyPI metadata: requires OpenCV, scikit-image,
SciPy, Pillow, NumPy) and torch-uncertainty 0.13 (requires einops and seaborn; its corruption
transforms also want kornia, SciPy and OpenCV, its model code Lightning and timm) cover all
the corruptions, but both use the ImageNet-C constants (e.g. Gaussian noise sigma .08 .. .38
instead of CIFAR's .04 .. .10) and the global RNG. This benchmark needs the CIFAR constants,
seeded, device-independent batches and no new dependency, so it uses this small torch module
(checked against Pillow's BOX resize bit for bit, and against SciPy's Gaussian filter and
matplotlib's HSV conversion within one grey level); for the complete CIFAR-10-C, evaluate on
the published ``.npy`` files.

Usage::

    from corruptions import SEVERITIES, corrupt, corruption_seed, parse_shift
    for name in parse_shift("all"):
        for s in SEVERITIES:
            xc = corrupt(x_test, name, s, generator=corruption_seed(0, name, s))

Every corruption is deterministic given a ``generator`` (a ``torch.Generator`` or an int
seed): noise is drawn on the generator's device (the CPU for a seed), so the output is
bit-identical on every run and does not depend on the device of ``x`` (pass a CUDA generator
to draw the noise on the GPU instead: faster, other bits). Batches are processed in chunks of
about 2^22 values: corrupting the 10,000 CIFAR test images (30 MB as uint8) raised the peak
memory by at most 150 MB, and all ten corruptions at one severity took 28 s on one CPU core
(shot noise, Gaussian blur and JPEG being the slowest, 4-7 s each).
"""

import zlib

import torch
import torch.nn.functional as F

__all__ = [
    "CONSTANTS",
    "CORRUPTIONS",
    "SEVERITIES",
    "parse_severities",
    "brightness",
    "contrast",
    "corrupt",
    "corruption_seed",
    "gaussian_blur",
    "gaussian_noise",
    "hsv_to_rgb",
    "impulse_noise",
    "jpeg_compression",
    "parse_shift",
    "pixelate",
    "rgb_to_hsv",
    "saturate",
    "shot_noise",
    "speckle_noise",
]

SEVERITIES = (1, 2, 3, 4, 5)

#: the CIFAR severity constants of make_cifar_c.py, severity 1..5
CONSTANTS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}

#: values per processed chunk (about 16 MB of float32)
CHUNK_VALUES = 1 << 22


# argument checks and plumbing -------------------------------------------------------------
def _check_severity(severity):
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}")
    return severity


def _check_images(x):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(
            f"x must be a uint8 tensor of images (N, 3, H, W), got {getattr(x, 'dtype', type(x).__name__)} "
            f"of shape {tuple(getattr(x, 'shape', ()))}"
        )


def _generator(generator):
    """A torch.Generator from a Generator, an int seed, or None (torch's default CPU generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator("cpu").manual_seed(generator)
    raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _draw(kind, shape, generator, device, **kw):
    """Random numbers drawn on the generator's device (CPU by default) and moved to ``device``."""
    where = generator.device if generator is not None else torch.device("cpu")
    if kind == "randn":
        r = torch.randn(shape, generator=generator, device=where)
    else:
        r = torch.rand(shape, generator=generator, device=where)
    return r.to(device)


def _to_float(x):
    return x.to(torch.float32) / 255.0


def _to_uint8(v):
    """Clip to [0, 1] and round to the nearest of the 256 grey levels."""
    return (v.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def _chunks(x):
    per = max(1, CHUNK_VALUES // max(1, x[0].numel() if len(x) else 1))
    return [x[i : i + per] for i in range(0, x.shape[0], per)]


def _float_corruption(fn):
    """Wrap ``fn(v, c, generator) -> v'`` on float [0, 1] chunks into a uint8 batch corruption."""
    name = fn.__name__.lstrip("_")

    def corruption(x, severity=1, generator=None):
        _check_images(x)
        c = CONSTANTS[name][_check_severity(severity) - 1]
        g = _generator(generator)
        out = torch.empty_like(x)
        i = 0
        for chunk in _chunks(x):
            out[i : i + len(chunk)] = _to_uint8(fn(_to_float(chunk), c, g))
            i += len(chunk)
        return out

    corruption.__name__ = corruption.__qualname__ = name
    corruption.__doc__ = (fn.__doc__ or "") + (
        f"\n\n    ``x``: uint8 ``(N, 3, H, W)``; ``severity`` in 1..5 (constants {CONSTANTS[name]});"
        " ``generator``: torch.Generator, int seed or None. Returns uint8 ``(N, 3, H, W)``."
    )
    return corruption


# colour space -----------------------------------------------------------------------------
def rgb_to_hsv(rgb):
    """RGB in [0, 1] ``(..., 3, H, W)`` to HSV in [0, 1], as scikit-image's ``rgb2hsv``.

    ``V = max(r, g, b)``, ``S = (V - min) / V`` (0 where ``V = 0``), and the hue ``H`` in sixths
    of a turn: ``(g - b) / delta`` where red is the maximum, ``2 + (b - r) / delta`` for green,
    ``4 + (r - g) / delta`` for blue (later cases win ties), then ``H = (H / 6) mod 1``; ``H = 0``
    for grey pixels (``delta = 0``).
    """
    r, g, b = rgb.unbind(-3)
    v, _ = rgb.max(dim=-3)
    delta = v - rgb.min(dim=-3)[0]
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = (g - b) / safe
    h = torch.where(g == v, 2.0 + (b - r) / safe, h)
    h = torch.where(b == v, 4.0 + (r - g) / safe, h)
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    return torch.stack((h, s, v), dim=-3)


# for hue sector i = floor(6 H) mod 6, which of (v, q, p, t) each of r, g, b takes
_SECTOR = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]])


def hsv_to_rgb(hsv):
    """HSV in [0, 1] ``(..., 3, H, W)`` to RGB, the inverse of :func:`rgb_to_hsv`.

    With ``i = floor(6H) mod 6``, ``f = 6H - floor(6H)``, ``p = V(1 - S)``, ``q = V(1 - fS)`` and
    ``t = V(1 - (1 - f)S)``, sector ``i`` gives ``(r, g, b)`` = (v,t,p), (q,v,p), (p,v,t),
    (p,q,v), (t,p,v), (v,p,q) for i = 0..5.
    """
    h, s, v = hsv.unbind(-3)
    h6 = h * 6.0
    fl = torch.floor(h6)
    f = h6 - fl
    i = torch.remainder(fl, 6).long()
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    cand = torch.stack((v, q, p, t), dim=0)  # (4, ..., H, W)
    table = _SECTOR.to(i.device)
    chans = [torch.gather(cand, 0, table[c][i].unsqueeze(0)).squeeze(0) for c in range(3)]
    return torch.stack(chans, dim=-3)


# noise ------------------------------------------------------------------------------------
@_float_corruption
def gaussian_noise(v, sigma, generator):
    """Additive Gaussian noise: ``v + sigma * eps``, ``eps ~ N(0, 1)`` per value."""
    return v + sigma * _draw("randn", v.shape, generator, v.device)


@_float_corruption
def shot_noise(v, lam, generator):
    """Photon (shot) noise: ``Poisson(lam * v) / lam`` per value."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.poisson((v * lam).to(where), generator=generator).to(v.device) / lam


@_float_corruption
def impulse_noise(v, amount, generator):
    """Salt and pepper: each value becomes 1 or 0 (probability 1/2 each) with probability ``amount``."""
    flipped = _draw("rand", v.shape, generator, v.device) < amount
    salt = _draw("rand", v.shape, generator, v.device) < 0.5
    return torch.where(flipped, salt.to(v.dtype), v)


@_float_corruption
def speckle_noise(v, sigma, generator):
    """Multiplicative Gaussian noise: ``v + v * sigma * eps``."""
    return v + v * sigma * _draw("randn", v.shape, generator, v.device)


# blur and pixels --------------------------------------------------------------------------
def _gaussian_kernel(sigma, truncate=4.0, dtype=torch.float32, device=None):
    """Normalised 1-D kernel ``exp(-k^2 / (2 sigma^2))``, ``|k| <= int(truncate * sigma + 0.5)`` (SciPy's rule)."""
    radius = int(truncate * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


@_float_corruption
def gaussian_blur(v, sigma, generator):
    """Separable Gaussian filter of standard deviation ``sigma`` pixels, edges repeated."""
    w = _gaussian_kernel(sigma, dtype=v.dtype, device=v.device)
    r = (len(w) - 1) // 2
    c = v.shape[1]
    v = F.conv2d(F.pad(v, (r, r, 0, 0), mode="replicate"), w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(v, (0, 0, r, r), mode="replicate"), w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@_float_corruption
def contrast(v, c, generator):
    """Contrast reduction: ``(v - m) * c + m`` with ``m`` the mean of each image's channel."""
    m = v.mean(dim=(-2, -1), keepdim=True)
    return (v - m) * c + m


@_float_corruption
def brightness(v, c, generator):
    """Brightness: add ``c`` to the HSV value (clipped to [0, 1]) and convert back to RGB."""
    h, s, val = rgb_to_hsv(v).unbind(-3)
    return hsv_to_rgb(torch.stack((h, s, (val + c).clamp(0.0, 1.0)), dim=-3))


@_float_corruption
def saturate(v, ab, generator):
    """Saturation change: HSV saturation ``S * a + b`` (clipped to [0, 1])."""
    a, b = ab
    h, s, val = rgb_to_hsv(v).unbind(-3)
    return hsv_to_rgb(torch.stack((h, (s * a + b).clamp(0.0, 1.0), val), dim=-3))


def _jpeg_pillow(chunk, quality):
    """JPEG round trip of uint8 ``(n, 3, H, W)`` CPU images through Pillow (the original's codec)."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for img in chunk:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def _jpeg_torchvision(chunk, quality):
    """JPEG round trip through ``torchvision.io`` (libjpeg, batched; its image codecs are deprecated since 0.29)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.stack(decode_jpeg(encode_jpeg(list(chunk.unbind(0)), quality=quality), mode=ImageReadMode.RGB))


def jpeg_compression(x, severity=1, generator=None):
    """JPEG re-encoding at quality 80, 65, 58, 50, 40 (severity 1..5).

    Through ``torchvision.io.encode_jpeg``/``decode_jpeg`` (batched), or Pillow where
    torchvision's codec is unavailable; both use libjpeg with 4:2:0 chroma subsampling and gave
    byte-identical files in our check. ``x``: uint8 ``(N, 3, H, W)``; ``generator`` is accepted
    for a uniform signature and unused.
    """
    _check_images(x)
    q = CONSTANTS["jpeg_compression"][_check_severity(severity) - 1]
    out = torch.empty_like(x)
    i = 0
    for chunk in _chunks(x):
        chunk = chunk.to("cpu").contiguous()
        try:
            dec = _jpeg_torchvision(chunk, q)
        except (ImportError, AttributeError, RuntimeError):
            dec = _jpeg_pillow(chunk, q)
        out[i : i + len(chunk)] = dec.to(x.device)
        i += len(chunk)
    return out


def _box_matrix(n_in, n_out, dtype=torch.float64, device=None):
    """``(n_out, n_in)`` row-stochastic matrix of Pillow's BOX resampling along one axis.

    With ``scale = n_in / n_out``, output pixel ``i`` averages the input pixels ``j`` whose
    centres ``j + 1/2`` lie in ``[i * scale, (i + 1) * scale)`` (at least the nearest one): an
    area average when shrinking, nearest-neighbour copying when enlarging.
    """
    scale = n_in / n_out
    centres = torch.arange(n_in, dtype=torch.float64) + 0.5
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * scale
    m = ((centres[None, :] >= lo) & (centres[None, :] < lo + scale)).to(torch.float64)
    empty = m.sum(1) == 0
    if empty.any():  # cannot happen for scale >= 1; guard for odd sizes
        nearest = ((lo[:, 0] + scale / 2) - 0.5).round().clamp(0, n_in - 1).long()
        m[empty, nearest[empty]] = 1.0
    return (m / m.sum(1, keepdim=True)).to(dtype=dtype, device=device)


def _box_resize(x, size):
    """Box-resample uint8 ``(N, C, H, W)`` to ``size = (h, w)`` as Pillow does: a horizontal pass, then a
    vertical one, each rounded to uint8 (halves up)."""
    cols = _box_matrix(x.shape[-1], size[1], torch.float32, x.device)
    y = (torch.einsum("nchw,jw->nchj", x.to(torch.float32), cols) + 0.5).floor_().clamp_(0, 255)
    rows = _box_matrix(x.shape[-2], size[0], torch.float32, x.device)
    y = (torch.einsum("ih,nchw->nciw", rows, y) + 0.5).floor_().clamp_(0, 255)
    return y.to(torch.uint8)


def pixelate(x, severity=1, generator=None):
    """Pixelation: box-downsample to ``int(c * H) x int(c * W)``, ``c`` = .95 .. .65, and box-upsample back.

    ``x``: uint8 ``(N, 3, H, W)``; ``generator`` is accepted for a uniform signature and unused.
    """
    _check_images(x)
    c = CONSTANTS["pixelate"][_check_severity(severity) - 1]
    h, w = x.shape[-2:]
    small = (max(1, int(h * c)), max(1, int(w * c)))
    out = torch.empty_like(x)
    i = 0
    for chunk in _chunks(x):
        out[i : i + len(chunk)] = _box_resize(_box_resize(chunk, small), (h, w))
        i += len(chunk)
    return out


#: corruption name -> function ``f(x_uint8, severity, generator=None) -> uint8``, CIFAR-10-C's names
CORRUPTIONS = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        speckle_noise,
        gaussian_blur,
        contrast,
        brightness,
        saturate,
        jpeg_compression,
        pixelate,
    )
}


def corrupt(x, name, severity, generator=None):
    """Corrupt uint8 images ``(N, 3, H, W)`` with corruption ``name`` at ``severity`` (1..5).

    ``generator``: a torch.Generator, an int seed, or None (torch's default generator). Returns
    a new uint8 tensor of the same shape on the same device.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](x, severity, generator)


def parse_shift(text):
    """Corruption names from a comma-separated list, or ``all`` for every corruption in :data:`CORRUPTIONS`.

    Whitespace is ignored and repeated names are kept once, in first-seen order.
    """
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"no corruption named in {text!r}: pass 'all' or a comma-separated list of {', '.join(CORRUPTIONS)}")
    out = []
    for n in names:
        if n == "all":
            new = list(CORRUPTIONS)
        elif n in CORRUPTIONS:
            new = [n]
        else:
            raise ValueError(f"unknown corruption {n!r}; known: {', '.join(CORRUPTIONS)} (or 'all')")
        out.extend(m for m in new if m not in out)
    return out


def parse_severities(text):
    """Severities from a comma-separated list of integers in 1-5 (``"3,5"``), sorted, each kept once."""
    out = set()
    for t in str(text).split(","):
        t = t.strip()
        if not t:
            continue
        if not t.isdigit() or int(t) not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {t!r}")
        out.add(int(t))
    if not out:
        raise ValueError(f"no severity named in {text!r}: pass a comma-separated list of {', '.join(map(str, SEVERITIES))}")
    return tuple(sorted(out))


def corruption_seed(seed, name, severity):
    """A seed for one (corruption, severity) derived from a run seed: ``seed * 1000003 + crc32(name) + severity``.

    Each shifted test set is then reproducible on its own, whatever the order or the subset of
    corruptions evaluated.
    """
    return (int(seed) * 1000003 + zlib.crc32(name.encode()) + int(severity)) % (2**63 - 1)
