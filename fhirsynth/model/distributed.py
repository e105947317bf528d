"""Multi-process DP-SGD (torchrun + Opacus DPDDP); train.py calls these hooks when a run is distributed.

Accounting for the GLOBAL batch:
  * every rank holds the whole dataset; DistributedUniformWithReplacementSampler shards it (a public, data-
    independent permutation) and Poisson-samples each rank's shard with the SAME rate q = 1/steps_per_epoch, so
    the union over ranks is exactly a Poisson sample of the global dataset at rate q (expected batch q * n).
  * Opacus' DistributedDPOptimizer adds noise sigma * C on rank 0 only, all-reduces the summed clipped
    gradients and divides by the global expected batch, so each step is one Gaussian-mechanism step on the
    global batch: every rank's accountant records the same (sigma, q) per step, as in a one-process run.
  * each rank's inclusion decisions come from the OS CSPRNG (securerng.secure_uniform) by default; only with
    reproducible noise (tests / research, no guarantee) are they drawn from a stream seeded by (seed, rank, step)
    at every loop start, so a resumed run never replays a stream.
Only rank 0 writes files (vocabulary, checkpoints, model dir); the DP vocabulary is built once on rank 0
and broadcast, so its noise is released once and every rank tokenizes identically.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fhirsynth.errors import UsageError

log = logging.getLogger(__name__)


def requested_by_env() -> bool:
    """True when launched by torchrun (or similar) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialized the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistContext:
    """Join (or create) the process group from torchrun's env:// variables; gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed", where="--distributed")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise UsageError(f"not launched by torchrun (environment lacks {', '.join(missing)}); run "
                         "`torchrun --nproc_per_node N -m fhirsynth train ...`", where="--distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    log.info("distributed DP training: rank %d of %d on %s", ctx.rank, ctx.world_size, device)
    return ctx


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's object on every rank (pickled; used for the vocabulary)."""
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(ctx: DistContext, *, wait: bool = True) -> None:
    """wait: barrier first, so rank 0 has finished writing the model dir when any rank returns."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    if ctx.owns_group:
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """DPDDP: broadcasts rank 0's weights; gradient sync happens in Opacus' distributed optimizer step."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    return DPDDP(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    return model.module if isinstance(model, DPDDP) else model


def _poisson_sampler_cls():
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

    class PoissonShardSampler(DistributedUniformWithReplacementSampler):
        """Opacus' distributed Poisson sampler, but an EMPTY draw is still yielded (Opacus skips it).

        Skipping would desynchronise the ranks' collective optimizer steps (a hang) and make the number of
        noised steps data-dependent; an empty physical batch is a noise-only step, as in one-process training.
        """

        def __init__(self, *, total_size: int, sample_rate: float, steps: int, seed: int, secure: bool) -> None:
            super().__init__(total_size=total_size, sample_rate=sample_rate, shuffle=True, shuffle_seed=seed,
                             steps=steps)
            self.base_seed = seed
            self.secure = secure
            self.generator = torch.Generator()
            self.begin(0)

        @property
        def steps(self) -> int:  # train.py sets .steps like on Opacus' one-process sampler
            return self.num_batches

        @steps.setter
        def steps(self, value: int) -> None:
            self.num_batches = value

        def begin(self, step: int) -> None:
            """Fresh per-rank stream for a loop starting at global step `step` (never replayed on resume)."""
            h = hashlib.sha256(f"{self.base_seed}/{self.rank}/{step}".encode()).digest()
            self.generator.manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))

        def __iter__(self):
            indices = torch.randperm(self.total_size, generator=torch.Generator().manual_seed(self.shuffle_seed))
            indices = indices[self.rank: self.total_size: self.num_replicas]
            for _ in range(self.num_batches):
                if self.secure:
                    from fhirsynth.model.securerng import secure_uniform

                    mask = torch.from_numpy(secure_uniform(self.num_samples) < self.sample_rate)
                else:
                    mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
                yield indices[mask.nonzero(as_tuple=False).reshape(-1)].tolist()

    return PoissonShardSampler


def make_loader(ds: Dataset, steps_per_epoch: int, seed: int, ctx: DistContext, collate_fn, *,
                secure: bool = True) -> DataLoader:
    """Loader for make_private(poisson_sampling=False): len == steps_per_epoch, so Opacus derives the same
    q = 1/steps_per_epoch as a one-process run; .sample_rate mirrors Opacus' DPDataLoader attribute."""
    sampler = _poisson_sampler_cls()(total_size=len(ds), sample_rate=1.0 / steps_per_epoch, steps=steps_per_epoch,
                                     seed=seed, secure=secure)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn)
    loader.sample_rate = 1.0 / steps_per_epoch  # type: ignore[attr-defined]
    return loader
