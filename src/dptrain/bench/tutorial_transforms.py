"""The tutorial's per-sample preprocessing, step for step, for machines without torchvision.

Every DP/DDP MNIST tutorial builds its data as ``torchvision.datasets.MNIST(...,
transform=Compose([ToTensor(), Normalize((0.1307,), (0.3081,))]))``. Per sample, that is:

1. the dataset turns the uint8 row into a PIL image (``Image.fromarray(img, mode="L")``);
2. ``Compose`` calls each transform in turn;
3. ``ToTensor`` logs its API use, checks the input type, copies the PIL pixels into a numpy
   array, wraps it as a tensor, views it HWC, permutes to CHW, makes it contiguous, checks for
   a byte tensor, converts to float and divides by 255;
4. ``Normalize`` is an ``nn.Module``, so it is called through ``Module.__call__``; its forward
   logs its API use, checks the tensor (type, float, rank), clones it, makes mean and std into
   tensors, checks std for zeros, views them ``(-1, 1, 1)``, then ``sub_`` and ``div_``.

When torchvision imports, :func:`tutorial_transform` uses it. Where it does not (here: its
wheels are built against a different torch), this module performs the same operations in the
same order, so the baseline costs what the tutorial costs rather than a trimmed-down version of
it. Its fidelity is measured, not assumed: ``benchmarks/tutorial_fidelity.py`` times this port
against real torchvision in a side environment (see ``benchmarks/README.md``). Without Pillow
the PIL round trip is skipped (the port then starts from the numpy array), which can only make
the baseline faster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

try:  # Pillow is light and on PyPI; it is in the [bench] and [dev] extras
    from PIL import Image
except ImportError:  # pragma: no cover - exercised only where Pillow is missing
    Image = None  # type: ignore[assignment]


def _log_api_usage(name: str) -> None:
    # torchvision logs every functional call this way (a no-op unless a logger is installed)
    torch._C._log_api_usage_once(f"torchvision.transforms.functional.{name}")


class ToTensor:
    """PIL image (or HW uint8 array) -> float CHW tensor in [0, 1], as torchvision does it."""

    def __call__(self, pic: object) -> torch.Tensor:
        _log_api_usage("to_tensor")
        is_pil = Image is not None and isinstance(pic, Image.Image)
        is_numpy = isinstance(pic, np.ndarray)
        if not (is_pil or is_numpy):
            raise TypeError(f"pic should be PIL Image or ndarray. Got {type(pic)}")
        if is_numpy and pic.ndim not in (2, 3):  # type: ignore[union-attr]
            raise ValueError(f"pic should be 2/3 dimensional. Got {pic.ndim} dimensions.")  # type: ignore[union-attr]
        float_dtype = torch.get_default_dtype()
        if is_numpy:
            array = pic if pic.ndim == 3 else pic[:, :, None]  # type: ignore[union-attr,index]
            img = torch.from_numpy(array.transpose((2, 0, 1))).contiguous()
            return img.to(dtype=float_dtype).div(255) if isinstance(img, torch.ByteTensor) else img
        mode_dtypes = {"I": np.int32, "I;16": np.int16, "F": np.float32}
        img = torch.from_numpy(np.array(pic, mode_dtypes.get(pic.mode, np.uint8), copy=True))  # type: ignore[union-attr]
        if pic.mode == "1":  # type: ignore[union-attr]
            img = 255 * img
        width, height = pic.size  # type: ignore[union-attr]
        img = img.view(height, width, len(pic.getbands()))  # type: ignore[union-attr]
        img = img.permute((2, 0, 1)).contiguous()
        if isinstance(img, torch.ByteTensor):
            return img.to(dtype=float_dtype).div(255)
        return img


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, out of place, as torchvision's tensor path does it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
        super().__init__()
        self.mean = mean
        self.std = std
        self.inplace = inplace

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        _log_api_usage("normalize")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"img should be Tensor Image. Got {type(tensor)}")
        if not (isinstance(tensor, torch.Tensor) and tensor.ndim >= 2):
            raise TypeError("Tensor is not a torch image.")
        if not tensor.is_floating_point():
            raise TypeError(f"Input tensor should be a float tensor. Got {tensor.dtype}.")
        if tensor.ndim < 3:
            raise ValueError(f"Expected tensor of size (..., C, H, W). Got {tuple(tensor.size())}")
        if not self.inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        if (std == 0).any():
            raise ValueError(f"std evaluated to zero after conversion to {tensor.dtype}")
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: object) -> object:
        for transform in self.transforms:
            img = transform(img)
        return img


def to_image(array: np.ndarray) -> object:
    """What ``torchvision.datasets.MNIST.__getitem__`` hands its transform: a mode-L PIL image."""
    # torchvision passes mode="L", which Pillow >= 11.3 deprecates; for a 2-D uint8 array Pillow
    # infers "L" itself, so the image is the same
    return array if Image is None else Image.fromarray(array)


def tutorial_transform(mean: float, std: float) -> tuple[Callable[[np.ndarray], torch.Tensor], str]:
    """The per-sample function (uint8 HW array -> normalised (1, H, W) tensor) and its name."""
    try:
        from torchvision import transforms
    except Exception:  # ImportError, or a torchvision built for another torch failing to load
        pipeline = Compose([ToTensor(), Normalize((mean,), (std,))])
        source = "dptrain's port of torchvision ToTensor + Normalize"
        source += " via PIL" if Image is not None else " (Pillow missing: no PIL step)"
        return (lambda img: pipeline(to_image(img))), source  # type: ignore[return-value]
    from PIL import Image as PILImage

    tv = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    return (lambda img: tv(PILImage.fromarray(img))), "torchvision ToTensor + Normalize via PIL"
