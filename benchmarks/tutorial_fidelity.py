"""How faithful is the tutorial baseline's per-sample transform? Time it against torchvision.

Where torchvision cannot be installed beside dptrain's torch, the loader benchmark's tutorial
loop uses :mod:`dptrain.bench.tutorial_transforms`, a step-for-step port of torchvision's
``ToTensor`` + ``Normalize``. This script measures, per sample and in one process, both the
port and real torchvision (PIL image in, normalised tensor out, as ``torchvision.datasets.MNIST``
feeds its transform), checks that they produce the same tensors, and writes the ratio.

Run it in an environment where torchvision is installed::

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.13.0 pillow numpy
    /tmp/tvenv/bin/pip install torchvision==0.28.0   # the release paired with torch 2.13
    PYTHONPATH=src /tmp/tvenv/bin/python benchmarks/tutorial_fidelity.py

torchvision's PyPI wheels carry compiled operators linked against CUDA builds of torch; with the
CPU build of torch they fail to load and ``import torchvision`` fails while registering their
fake kernels. ``ToTensor`` and ``Normalize`` are pure Python and use none of those operators, so
this script (and only this script) skips the registration of ``torchvision::*`` fake kernels
when that is what stops the import. It says so in its result file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dptrain.bench import machine_info, mean_std
from dptrain.bench.tutorial_transforms import Compose, Normalize, ToTensor, to_image

HERE = Path(__file__).resolve().parent
MEAN, STD = 0.1307, 0.3081


def import_torchvision() -> tuple[Any, str]:
    try:
        import torchvision
        from torchvision import transforms

        return transforms, f"torchvision {torchvision.__version__} imported normally"
    except RuntimeError as exc:  # compiled ops missing -> fake-kernel registration fails
        if "torchvision::" not in str(exc):
            raise
    import sys

    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake

    def skip_torchvision_ops(name: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str) and name.startswith("torchvision::"):
            return lambda fn: fn
        return register_fake(name, *args, **kwargs)

    torch.library.register_fake = skip_torchvision_ops  # type: ignore[assignment]
    try:
        import torchvision
        from torchvision import transforms
    finally:
        torch.library.register_fake = register_fake
    note = (
        f"torchvision {torchvision.__version__}: its compiled operators do not load with torch "
        f"{torch.__version__}; their fake-kernel registration was skipped (ToTensor and "
        "Normalize do not use them)"
    )
    return transforms, note


def per_sample_us(fn: Any, images: np.ndarray) -> float:
    start = time.perf_counter()
    for img in images:
        fn(img)
    return (time.perf_counter() - start) / len(images) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--out", default=str(HERE / "results" / "tutorial_fidelity.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transforms, how = import_torchvision()
    from PIL import Image

    real = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    port = Compose([ToTensor(), Normalize((MEAN,), (STD,))])
    variants = {
        "torchvision": lambda img: real(Image.fromarray(img)),
        "dptrain_port": lambda img: port(to_image(img)),
    }
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.samples, 28, 28), dtype=np.uint8)
    for img in images[:50]:
        torch.testing.assert_close(variants["dptrain_port"](img), variants["torchvision"](img))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, fn in variants.items():
            times[name].append(per_sample_us(fn, images))
    stats = {name: mean_std(values) for name, values in times.items()}
    ratio = stats["dptrain_port"]["mean"] / stats["torchvision"]["mean"]
    result = {
        "benchmark": "tutorial_fidelity",
        "how_torchvision_was_imported": how,
        "outputs_equal": True,
        "per_sample_us": stats,
        "port_over_torchvision_time": ratio,
        "machine": machine_info(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(how)
    for name, s in stats.items():
        print(f"{name:14s} {s['mean']:7.1f} ± {s['std']:.1f} µs per sample")
    print(f"port / torchvision time: {ratio:.3f}  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
