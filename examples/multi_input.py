"""Several inputs, a dict batch and a model that computes its own loss (HuggingFace style),
under DDP with 2 processes.

A map-style Dataset yields one dict per sample; the DataLoader collates them into a dict
batch, which dptrain moves to the device as a structure and passes as ``model(**batch)``.
The model returns ``{"loss": ..., "logits": ...}``: its own loss is trained as is, and the
``logits`` with the batch's ``labels`` give the accuracy.

Run:  python examples/multi_input.py [OUT_DIR]
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import dptrain

TOKENS, FEATURES, CLASSES = 50, 6, 4


class Reviews(Dataset):
    """A token sequence and some numeric features per sample; the class depends on both."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, TOKENS, (n, 12), generator=g)
        self.features = torch.randn(n, FEATURES, generator=g)
        score = (self.tokens < TOKENS // 2).float().mean(1) * 4 + self.features[:, 0]
        self.labels = torch.bucketize(score, torch.tensor([1.5, 2.0, 2.5]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[i], "features": self.features[i],
                "labels": self.labels[i]}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(TOKENS, 32)
        self.numeric = nn.Linear(FEATURES, 32)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, tokens: torch.Tensor, features: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(tokens) + self.numeric(features))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_data() -> tuple[Dataset, Dataset]:
    return Reviews(4096, seed=0), Reviews(1024, seed=1)


if __name__ == "__main__":  # needed: the worker processes re-import this file
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/example-multi-input"
    summary = dptrain.fit(Classifier, make_data, nproc=2, epochs=4, lr=0.01, batch_size=32,
                          optimizer="adam", out=out, quiet=True)
    print(f"test accuracy {summary['test_accuracy']:.4f} ({summary['test_samples']} samples, "
          f"{summary['world_size']} processes)")
