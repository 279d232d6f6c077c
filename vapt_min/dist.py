"""Data-parallel training under torchrun: one process per GPU (or per CPU process), DistributedDataParallel.

    torchrun --nproc_per_node 4 -m vapt_min.train --batch-size 128    # 4 ranks × 32 images, one 128-image step

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. Without them every helper here is a no-op and train.py is the plain
one-process loop. The rules that make N processes train like one:
  - `--batch-size` is the global batch; `GlobalBatchSampler` cuts each global batch of one seeded permutation into
    rank slices, so step t sees the same images for any world size (only float summation order differs);
  - metrics are sums (loss·n, correct, n) all-reduced across ranks before any ratio is taken;
  - only rank 0 prints and writes files; every rank reads a checkpoint on --resume.
Exact for per-image losses (CE, V²APT's KL). A loss over the batch as a whole (DA-VPT's Proxy-Anchor terms) sees
each rank's slice, as per-GPU BatchNorm statistics would; dropout and sampled prompts draw per rank. ViaPT's
running PCA statistics are averaged over the ranks at every update (pca_fusion.RunningPCA), so all ranks keep one
basis: its refresh rewrites the learnt coordinates W_i, which must stay identical on every rank.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

_COMM_DEVICE = torch.device("cpu")  # where collectives put their tensors: cuda:LOCAL_RANK for NCCL, cpu for gloo


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU). Returns (rank, world size)."""
    global _COMM_DEVICE
    rank, world, _ = env_ranks()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _COMM_DEVICE = device if device.type == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size()


def per_rank_batch(batch_size: int, world: int | None = None) -> int:
    """The images each process takes per step: `batch_size` is the global batch and must split evenly."""
    world = env_ranks()[1] if world is None else world
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must split evenly over {world} processes: "
                         f"use a multiple of {world}, e.g. {world * max(1, round(batch_size / world))}")
    return batch_size // world


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over all ranks (float64, one collective); the dict itself when not distributed.
    Every rank must pass the same keys."""
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_COMM_DEVICE)
    dist.all_reduce(t)
    summed = dict(zip(keys, t.tolist()))
    return {k: summed[k] for k in values}  # the caller's key order


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: lets all ranks stop together instead of hanging in a collective."""
    return bool(all_reduce_sum({"flag": float(flag)})["flag"])


def barrier():
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others read); a no-op in one process."""
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (any picklable object); `obj` itself when not distributed."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_COMM_DEVICE)
    return box[0]


def shard(samples, rank: int, world: int):
    """A rank's part of an evaluation split (every world-th item): counts are summed afterwards, so any partition
    will do."""
    return samples if world == 1 else samples.subset(range(rank, len(samples), world))


class GlobalBatchSampler(Sampler):
    """Batches of indices for one rank: each global batch of a seeded permutation, cut into `world` contiguous slices.

    The permutation is drawn from `generator` exactly as DataLoader(shuffle=True, generator=...) draws it (one
    randperm per pass, plus the discarded second one RandomSampler makes at the end of a full pass), so a one-process
    run keeps the batch order it had before this sampler existed, and resume only needs the generator's state. Every
    rank seeds the generator the same way, so all ranks agree on the permutation without a set_epoch: the union of the
    rank slices at step t is the one-process batch t. A last, partial global batch is cut as evenly as possible; if it
    has fewer images than ranks it is dropped (a rank with no images could not take part in the gradient all-reduce).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        per_rank_batch(batch_size, world)
        self.n, self.batch_size, self.generator, self.rank, self.world = n, batch_size, generator, rank, world

    def global_size(self, i: int) -> int:
        """Images in global batch i, over all ranks."""
        return min(self.batch_size, self.n - i * self.batch_size)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + int(rest >= self.world)  # rest = 0 never counts: world >= 1

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        full = self.n // self.batch_size
        for i in range(len(self)):
            if i == full:  # RandomSampler's second draw, made when the batch sampler asks past the end of the pass
                torch.randperm(self.n, generator=self.generator)
            batch = perm[i * self.batch_size:(i + 1) * self.batch_size]
            cuts = [len(batch) * r // self.world for r in range(self.world + 1)]  # an even split: sizes differ by <= 1
            yield batch[cuts[self.rank]:cuts[self.rank + 1]]
        if len(self) == full:
            torch.randperm(self.n, generator=self.generator)
