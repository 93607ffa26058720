"""The data of examples/cifar_resnet.py: torchvision CIFAR-10/100 and SVHN, CIFAR-shaped synthetic
data, image folders (through ``folder_data.py``), augmentation and normalisation.

Every loader returns uint8 images ``(N, 3, H, W)`` on the CPU (and long labels); a problem the user
can fix (a missing data set, a failed download, a broken image folder) is a one-line
:class:`UsageError`. Imported by the script as a sibling module (``from cifar_data import ...``).
"""

import numpy as np
import torch
import torch.nn.functional as F

from folder_data import FolderDataError, load_image_folder

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}


class UsageError(Exception):
    """A problem the user can fix; reported in one line with exit code 2."""


# loaders ------------------------------------------------------------------------------------
def _torchvision(name, make, data_dir, download):
    """Build a torchvision data set; a missing set or a failed download is a one-line UsageError."""
    try:
        return make()
    except RuntimeError as e:
        if download:
            raise UsageError(f"downloading {name} into {data_dir} failed ({e}); download it by hand and pass --data-dir") from e
        raise UsageError(
            f"{name} not found in {data_dir!r}: pass --download to fetch it, or --data-dir pointing at the folder "
            f"holding {LAYOUT[name]}"
        ) from e
    except OSError as e:
        raise UsageError(f"downloading {name} into {data_dir} failed ({e}); download it by hand and pass --data-dir") from e


OOD_SETS = ("svhn", "cifar10", "cifar100")  #: and folder:PATH, any image folder
LAYOUT = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "test_32x32.mat"}


def _cifar_tensors(ds):
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return x, torch.as_tensor(ds.targets, dtype=torch.long)


def load_cifar(name, data_dir, download):
    """Training and test sets as uint8 tensors ``(N, 3, 32, 32)`` and labels, via torchvision."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    train = _torchvision(name, lambda: cls(root=data_dir, train=True, download=download), data_dir, download)
    test = _torchvision(name, lambda: cls(root=data_dir, train=False, download=download), data_dir, download)
    return _cifar_tensors(train), _cifar_tensors(test)


def load_ood(name, data_dir, download):
    """The test images of an out-of-distribution set (``svhn``, ``cifar10``, ``cifar100``), uint8 ``(N, 3, 32, 32)``."""
    import torchvision

    if name == "svhn":
        ds = _torchvision(name, lambda: torchvision.datasets.SVHN(root=data_dir, split="test", download=download), data_dir, download)
        return torch.from_numpy(np.asarray(ds.data)).contiguous()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return _cifar_tensors(_torchvision(name, lambda: cls(root=data_dir, train=False, download=download), data_dir, download))[0]


def synthetic_cifar(n_train=512, n_test=256, num_classes=10, seed=0):
    """CIFAR-shaped data that a small network can learn: a smooth class template plus noise.

    Templates are random 4x4 colour patterns upsampled to 32x32, so crops and flips keep
    most of the class signal.
    """
    g = torch.Generator("cpu").manual_seed(seed)  # data are made on the CPU, whatever the default device
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g, device="cpu")
    templates = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) * 255

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g, device="cpu")
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=g, device="cpu") * 255
        return x.to(torch.uint8), y

    return make(n_train), make(n_test)


def normalise(x, mean, std):
    """uint8 images to floats with per-channel ``mean`` and ``std`` (in [0, 1] units)."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def augment(x):
    """Random crop with 4-pixel zero padding and random horizontal flip (torch RNG, on device), any image size."""
    n, dev = x.shape[0], x.device
    h, w = x.shape[-2:]
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,)).to(dev)
    j = torch.randint(0, 9, (n,)).to(dev)
    flip = (torch.rand(n) < 0.5).to(dev)
    rows = (i[:, None] + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
    offs = torch.arange(w, device=dev)
    cols = j[:, None] + torch.where(flip[:, None], w - 1 - offs, offs)  # (n, w), reversed when flipped
    out = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols[:, None, :]]  # (n, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()


def load_folder(data_dir, image_size, progress):
    """``((x_train, y_train), (x_test, y_test), classes)`` of an image folder (``examples/folder_data.py``);
    a :class:`FolderDataError` becomes a one-line :class:`UsageError`."""
    try:
        ds = load_image_folder(data_dir, image_size=image_size, progress=progress)
    except FolderDataError as e:
        raise UsageError(f"--dataset folder --data-dir {data_dir}: {str(e).replace('image_size=N', '--image-size N')}") from e
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), ds.classes


def resize_images(x, size):
    """uint8 images ``(N, 3, H, W)`` resized to ``size x size`` (antialiased bilinear, as ``--image-size``)."""
    from torchvision.transforms.v2.functional import resize

    return x if tuple(x.shape[-2:]) == (size, size) else resize(x, [size, size], antialias=True)
