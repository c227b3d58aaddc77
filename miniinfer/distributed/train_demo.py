"""A pipeline-parallel training step of the bundled model, for ``torchrun`` (or alone: it spawns its ranks).

    torchrun --nproc-per-node 2 -m miniinfer.distributed.train_demo --schedule 1f1b --micro-batches 4
    python -m miniinfer.distributed.train_demo --ranks 2 --schedule gpipe

Every rank loads the bundled ``shakespeare`` model and runs one forward + backward step over its stage on a
random batch; the last stage prints the loss, rank 0 the measured bubble against (p−1)/(m+p−1) and, with
``--check``, the largest gradient difference from one process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def step(args) -> dict:
    from miniinfer.distributed import testing
    from miniinfer.distributed.pp import bubble_theory, measured_bubble

    result = testing.pp_step("shakespeare", args.batch, args.length, args.micro_batches, args.schedule, args.seed,
                             (args.op_ms / 1000, 2 * args.op_ms / 1000) if args.op_ms else None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        p = len(gathered)
        print(f"{args.schedule}: p={p} m={args.micro_batches} loss {gathered[-1].loss:.5f}; bubble measured "
              f"{measured_bubble(gathered):.3f}, theory {bubble_theory(p, args.micro_batches):.3f}; activations held "
              f"per stage {[r.peak_in_flight for r in gathered]}")
        if args.check:
            model = testing.build_model("shakespeare").requires_grad_(True)
            ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length + 1),
                                generator=torch.Generator().manual_seed(args.seed))
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            grads = {n: g for r in gathered for n, g in r.grads.items()}
            worst = max((grads[n] - p.grad).abs().max().item() for n, p in model.named_parameters())
            print(f"one process: loss {loss.item():.5f}; max gradient difference {worst:.2e}")
    return {"loss": gathered[-1].loss}


def _spawned(args):
    return step(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--op-ms", type=float, default=0.0, help="pad each forward op to this many ms (B: twice)")
    parser.add_argument("--ranks", type=int, default=2, help="without torchrun: how many processes to spawn")
    parser.add_argument("--check", action="store_true", help="compare the gradients with one process")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        from miniinfer.distributed.group import init_distributed

        init_distributed(backend="gloo")
        step(args)
        dist.destroy_process_group()
    else:
        from miniinfer.distributed.group import WorkerPool

        with WorkerPool(args.ranks, task_timeout_s=600) as pool:
            pool.run(_spawned, args)


if __name__ == "__main__":
    main()
