"""Your own training loop, data-parallel: the DDP MNIST tutorial's script, with dptrain.Session.

The tutorial's ``init_process_group``, ``DistributedSampler``, DDP wrap, ``no_sync``, rank-0
checks, checkpoint and ``destroy_process_group`` lines are the Session's calls below; the loop
stays yours. N processes with ``--batch-size B`` train exactly like one process with
``--batch-size N*B`` (tests/integration/test_session.py).

Run:
  python examples/own_loop.py                                    # one process
  dptrain run examples/own_loop.py --nproc 2                     # DDP, 2 local workers
  torchrun --standalone --nproc-per-node 2 examples/own_loop.py  # the same under torchrun
  srun --ntasks 2 python examples/own_loop.py                    # ... under SLURM
Flags: --dataset {synthetic,mnist,fashion-mnist} --model {linear,convnet} --epochs E
--max-steps N --batch-size B (per process) --accum K --lr LR --out DIR --ckpt-every N.
Run it again with the same --out to continue from the newest checkpoint.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dptrain
from dptrain.data.datasets import load_splits
from dptrain.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "mnist",
                                                              "fashion-mnist"])
    p.add_argument("--data-root", default="./data")
    p.add_argument("--model", default="linear", choices=["linear", "convnet"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="0 = no cap")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default="runs/own-loop")
    p.add_argument("--ckpt-every", type=int, default=0)
    args = p.parse_args()

    with dptrain.Session(seed=0, out=args.out) as s:
        data = load_splits(args.dataset, args.data_root, log=s.print)
        norm = (data.mean, data.std)  # uint8 images -> (x / 255 - mean) / std per batch
        model = build_model(args.model)  # after Session(): the same start on every rank
        model, opt = s.setup(model, lambda params: torch.optim.SGD(params, lr=args.lr))
        loader = s.loader(data.train_x, data.train_y, batch_size=args.batch_size,
                          accum=args.accum, normalize=norm)
        start = s.resume(model, opt)  # the newest checkpoint in --out, if there is one
        step, total = start.step, args.epochs * loader.steps_per_epoch
        total = min(total, args.max_steps) if args.max_steps else total
        epoch = start.epoch
        while step < total:
            for micro in loader.epoch(epoch, start.step_in_epoch if epoch == start.epoch else 0):
                for x, y in s.accumulate(model, micro):  # gradients synchronised once
                    loss = F.cross_entropy(model(x), y)
                    s.backward(loss / len(micro))
                s.step(opt)
                step += 1
                if step % 10 == 0 or step == total:  # the mean over the ranks, from rank 0
                    s.log(step, loss=s.all_reduce(loss.detach(), "mean"))
                if args.ckpt_every and step % args.ckpt_every == 0:
                    s.save(step, model, opt)
                if step == total:
                    break
            epoch += 1
        metrics = s.evaluate(model, data.test_x, data.test_y, normalize=norm, step=step)
        s.save(step, model, opt)
        s.print(f"test accuracy {metrics['accuracy']:.4f} on {metrics['samples']} samples | "
                f"{step} steps | {s.strategy.name} x {s.world_size} on {s.device}")


if __name__ == "__main__":
    main()
