"""The processes of a datastore build: one, or several under ``accelerate launch``.

    accelerate launch --cpu --num_processes 2 -m silo.cli datastore build --config C      # CPU processes
    accelerate launch --multi_gpu --num_processes 8 -m silo.cli datastore build --config C  # GPUs
    accelerate launch --num_machines 2 --machine_rank R --main_process_ip IP --main_process_port P \\
        --num_processes 16 -m silo.cli datastore build --config C                       # machines

Every rank reads the same corpus in the same order and takes a deterministic share of the documents
(`document_shares`: contiguous runs of documents, balanced by characters), encodes it with the model on its
own device and writes its part of each shard it touches (`encode.py`). After a barrier the main process
merges the parts in rank order, which is document order, so the shards hold the same entries in the same
order as a single-process build; it alone trains the shared quantizer, fills the indexes and writes the
manifest, once. Ranks other than the main one return when their share is written. With several machines,
`output_dir` must be on a filesystem they all see.

Ranks talk through ``torch.distributed`` as set up by accelerate's `PartialState` (gloo on CPU, NCCL on
GPU); a failure on one rank is sent to all of them, which stop naming the rank and its error.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from .format import DatastoreError

# A rank that finished its share waits for the slowest one at the barrier: allow long builds.
BARRIER_TIMEOUT = timedelta(hours=12)


def launched_by_accelerate() -> bool:
    """True inside `accelerate launch` (its launchers always set ACCELERATE_MIXED_PRECISION) or any
    torch.distributed launch with several processes."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class BuildRanks:
    """Rank, world size and device of this process; a plain run is rank 0 of 1 (no torch.distributed)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the device accelerate assigned (None: the build's own choice)
    _state: Any = None

    @classmethod
    def from_env(cls) -> "BuildRanks":
        if not launched_by_accelerate():
            return cls()
        import torch
        from accelerate import PartialState

        # CPU processes: asked for (--cpu), or no GPU (`--multi_gpu` on a CPU machine, torchrun): gloo
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
        if state.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            print("datastore build: accelerate started one process. Its --cpu launcher starts several only "
                  "through MPI (--mpirun_hostfile); for several CPU processes on one machine use "
                  "`accelerate launch --multi_gpu --num_processes P` on a machine without GPUs, or "
                  "`torchrun --nproc_per_node P -m silo.cli ...`. Building in this one process.", file=sys.stderr)
        return cls(rank=state.process_index, world=state.num_processes, device=str(state.device), _state=state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self._state.wait_for_everyone()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main process's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shared_tmp(self, out: Path) -> Path:
        """The build's temporary folder beside `out`, named by the main process and created by it before
        any rank writes into it."""
        tmp = Path(self.broadcast(str(out.with_name(f".{out.name}.tmp-build-{os.getpid()}"))))
        self.barrier()
        return tmp

    def check_all(self, error: str | None) -> None:
        """Raise on every rank if any rank reported an error (each rank passes its own, or None)."""
        errors = self.gather(error)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            raise DatastoreError("datastore build failed on " + "; ".join(f"rank {r}: {e}" for r, e in bad))


def document_shares(sizes: dict[str, Sequence[int]], world: int) -> list[dict[str, range]]:
    """Split the documents of every group (sizes: characters per document, groups in build order) into
    `world` contiguous shares of about equal characters. Share r maps group -> range of document indices;
    concatenating the shares in rank order gives every document once, in order."""
    flat = [(g, i, n) for g, ns in sizes.items() for i, n in enumerate(ns)]
    total = sum(n for _, _, n in flat) or 1
    shares: list[dict[str, range]] = [{} for _ in range(world)]
    before = 0
    for g, i, n in flat:
        r = min(world - 1, before * world // total)  # the rank whose slice of characters this document starts in
        have = shares[r].get(g)
        shares[r][g] = range(have.start if have else i, i + 1)
        before += n
    return shares
