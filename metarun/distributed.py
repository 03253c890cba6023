"""One run on several processes (``torchrun``): the process group from torchrun's environment, the
rank that owns the run folder, one all-reduce per meta-step over a flat buffer, agreeing to stop,
and sharding a fixed task set.

metarun's meta-step calls the model through ``torch.func.functional_call``, so DDP's hooks (which
belong to ``nn.Module.forward``) never fire: the meta-gradients are averaged here, explicitly, once
per step, in one flat buffer (the fastest on gloo).

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) every function here is the identity
of a single process: rank 0 of 1, nothing is communicated.

The collective timeout is ``METARUN_COLLECTIVE_TIMEOUT`` seconds (default 600): a rank that hangs
makes the others stop with one line after that long; a rank that dies is noticed at once (its
connections close) and torchrun stops the rest.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metarun.utils.errors import ConfigError, MetarunError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600


class DistributedError(MetarunError):
    """Another rank stopped answering (it died, or hangs past the collective timeout) during
    ``what``; ``phase`` is set once the run's phase has named it (``trainers.loop.phase``)."""

    def __init__(self, what: str, cause: str, recover: str, phase: str | None = None) -> None:
        self.what, self.cause, self.phase = what, cause, phase
        where = f"{what} ({cause})" if phase is None or phase == what else f"{phase} ({what}: {cause})"
        super().__init__(f"rank {rank()} of {world_size()} lost the other ranks during {where}; the job stops. {recover}")


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The rank that owns the run folder, the log, TensorBoard and the checkpoints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> None:
    """Join torchrun's process group (gloo on CPU; NCCL when this rank has a GPU), once. Called by
    the entry point before Hydra composes anything, so rank 0 can choose the run folder."""
    if not launched() or dist.is_initialized():
        return
    timeout = timedelta(seconds=float(os.environ.get("METARUN_COLLECTIVE_TIMEOUT", DEFAULT_TIMEOUT_S)))
    backend = "nccl" if torch.cuda.is_available() and local_rank() < torch.cuda.device_count() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timeout)


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def device_for(name: str) -> str:
    """The device a rank trains on: ``auto`` / ``cuda`` become this rank's GPU (``cuda:LOCAL_RANK``)
    under torchrun; a GPU rank that has no GPU of its own is an error."""
    if world_size() == 1 or name == "cpu":
        return name
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    if name in ("auto", "cuda"):
        count, per_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        if count == 0:  # device=cuda on a machine without one: not a matter of --nproc_per_node
            raise ConfigError(f"device={name} under torchrun but no GPU is visible on this node: give device=cpu "
                              "(or auto) to train on CPU processes")
        if per_node > count:  # the same check, and the same line, on every rank
            raise ConfigError(f"torchrun started {per_node} processes on this node but only {count} GPU(s) are "
                              f"visible: give --nproc_per_node={count} (or device=cpu for CPU processes)")
        return f"cuda:{local_rank()}"
    raise ConfigError(f"device={name} under torchrun: give device=auto or cuda (each rank takes the GPU of its "
                      "LOCAL_RANK) or device=cpu")


def _guard(what: str, fn: Callable[[], T]) -> T:
    """Run a collective; another rank's death or a timeout becomes one clear line."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]  # gloo's "[source:line] Read error ...: reset by peer"
        raise DistributedError(what, cause[:120], "Resume it from the run folder's last checkpoint (metarun "
                               "resume=<run folder>, with torchrun or without)") from exc


def broadcast_object(value: T, what: str = "set-up") -> T:
    """Rank 0's ``value`` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    _guard(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def all_gather_object(value: Any, what: str) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    _guard(what, lambda: dist.all_gather_object(out, value))
    return out


def average(tensors: Sequence[Tensor], what: str = "the meta-step") -> list[Tensor]:
    """The mean of each tensor over the ranks, with one all-reduce over one flat buffer."""
    if world_size() == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _guard(what, lambda: dist.all_reduce(flat))
    flat /= world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def average_dict(values: dict[str, Tensor], *extra: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
    """:func:`average` of a dict of tensors (a meta-gradient) and a few more tensors (the loss)."""
    if world_size() == 1:
        return values, list(extra)
    out = average([*values.values(), *extra])
    return dict(zip(values, out[:len(values)])), out[len(values):]


def max_over_ranks(*values: int, what: str = "agreeing to stop") -> list[int]:
    """Each value's maximum over the ranks, on every rank: a stop is agreed in the same iteration."""
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    box = torch.tensor(values, dtype=torch.float64, device=device)  # (exact for integers below 2**53)
    _guard(what, lambda: dist.all_reduce(box, op=dist.ReduceOp.MAX))
    return [int(v) for v in box.tolist()]


def check_meta_batch(meta_batch_size: int) -> int:
    """The tasks of a meta-batch each rank takes: ``meta_batch_size`` is the global meta-batch and
    must split evenly over the ranks (an uneven split would weight the ranks' tasks unequally)."""
    world = world_size()
    if world > meta_batch_size:
        raise ConfigError(f"{world} processes but algorithm.meta_batch_size={meta_batch_size}: every rank needs at "
                          f"least one task (use at most {meta_batch_size} processes or a larger meta-batch)")
    if meta_batch_size % world:
        raise ConfigError(f"algorithm.meta_batch_size={meta_batch_size} does not split evenly over {world} processes "
                          "(the meta-batch is global: give a multiple of the number of processes)")
    return meta_batch_size // world


def launcher() -> dict:
    """How torchrun started this job, for run_info.json, so that the run can be started again from its
    folder: torchrun's command line (the elastic agent's, this process's parent, read from ``/proc``
    on Linux; elsewhere one rebuilt from torchrun's environment) and the layout it gave."""
    env = os.environ
    per_node = int(env.get("LOCAL_WORLD_SIZE", world_size()))
    info = {"name": "torchrun", "nproc_per_node": per_node,
            "nnodes": int(env.get("GROUP_WORLD_SIZE", max(1, world_size() // per_node))),
            "max_restarts": int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)),
            "restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", 0))}
    command = None
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if w]
        if any(w.endswith("torchrun") or w == "torch.distributed.run" for w in words):
            command = words
    except OSError:
        pass
    info["command"] = command or ["torchrun", f"--nnodes={info['nnodes']}", f"--nproc_per_node={per_node}",
                                  "-m", "metarun", *sys.argv[1:]]
    return info


def rank_seed(seed: int) -> int:
    """The seed of this rank's own task stream: ``seed`` itself on rank 0 (so one process draws what
    it always drew), a seed derived from ``(seed, rank)`` on the others."""
    if rank() == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank()]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def shard(count: int, chunk: int) -> list[int]:
    """The starts of the chunks of ``range(count)`` this rank evaluates (round robin): the chunks
    are the same for every world size, so gathered results are too."""
    return list(range(chunk * rank(), count, chunk * world_size()))


def gather_chunks(parts: dict[int, Any], what: str) -> list[Any]:
    """Every rank's ``{start: result}`` chunks, merged and in order of their start."""
    merged: dict[int, Any] = {}
    for part in all_gather_object(parts, what):
        merged.update(part)
    return [merged[k] for k in sorted(merged)]


def finish() -> None:
    """End a torchrun process whose run ended well: leave the group together with the other ranks,
    flush the logs and streams, and exit without the interpreter's finalisation, where gloo's
    worker threads are torn down after the interpreter that their tensors point into ("terminate
    called without an active exception", SIGABRT, about one 2-rank run in ten here, after every
    file was written), which torchrun reports as a failed job. One process alone just returns."""
    if not dist.is_initialized():
        return
    close(together=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def close(together: bool = False) -> None:
    """Leave the process group. After a run that ended well on every rank, ``together`` meets the
    others at a barrier first: a rank that tears gloo down while a peer still sends its last
    message can abort the peer ("terminate called without an active exception", about one run in
    six here). After an error a rank leaves at once, so that its peers fail fast instead of waiting
    at the barrier for the collective timeout."""
    if dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()
