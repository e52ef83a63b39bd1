r"""Data-parallel training on ``torch.distributed``: the single-process computation, spread out.

When a process group is initialized (``torch.distributed.init_process_group``,
as ``torchrun`` sets up), :func:`~pyro_lunet.fit_density` trains data-parallel
with no change to the call: every rank holds the same data and the same flow
(broadcast from rank 0 at the start, the data checked identical), walks the
same seeded global batches, and takes its contiguous shard of each
(:func:`shard`). Each rank's loss is its shard's summed NLL divided by the
*global* batch size, plus :func:`~pyro_lunet.penalty` divided by the world
size, so the gradients summed over the ranks (:func:`all_reduce_gradients`,
one flattened bucket per dtype and device) are the single-process gradients of
the global batch up to rounding. Every rank then takes the same optimizer step
and the same maintenance (rank-one merges and corrections, self-normalizing
log-determinant tracking are deterministic given identical parameters and step
counts; a rank-one layer redraws :math:`v` from its own seed), validation
sums are reduced across ranks (:func:`mean_nll`), only rank 0 prints, and after
every epoch :func:`check_replicas` compares checksums of every parameter,
buffer and counter across ranks (one collective) and raises if any differ:
divergence is an error, never silent.

Batches with fewer rows than ranks give the ranks without a row of their own
a copy of the batch's first row with weight zero, so every rank runs the same
layers the same number of times.

What "the same" covers: every family's forward, gradients, optimizer steps,
rank-one merges, drift corrections and :math:`v` redraws, and the
self-normalizing tracked log-determinant, to rounding (the gradient sum is
added in another order). One exception: a self-normalizing layer with
:math:`D > \max(\text{rows per rank}, 32)` estimates its reconstruction
term with random probes, which each rank draws for itself (as many as its
rows, at least 32): the data-parallel gradient then averages the ranks'
estimates, of the same expectation as one process's but not the same
numbers. The replicas still stay identical (they all step with the summed
gradient). Parameters that get no gradient must be the same on every rank
(they are, for the same model and loss): the all-reduce leaves them out.
A failing rank makes the others raise :class:`CollectiveError` once its
process exits (its sockets close), at the latest after the process group's
``timeout``; ``torchrun`` also stops the other ranks itself.

Launching. One machine, ``N`` processes (``gloo`` on CPU, ``nccl`` with one
GPU a process)::

    torchrun --nproc-per-node N -m pyro_lunet fit DATA ...
    # the same through the command line: pyro-lunet fit DATA ... --nproc N
    # (which calls launch(argv, N), i.e. python -m torch.distributed.run)

Several machines, with ``torchrun``'s own rendezvous options, the same command
on each machine::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id RUN_ID -m pyro_lunet fit DATA ...

Under ``torchrun`` a program runs inside :func:`process_group_from_env` (or
calls :func:`init_from_env`; both do nothing when the process was not started
by a launcher) and writes files only where :func:`is_main_process` (e.g.
through :func:`write_on_main`).

Data-parallel SVI with a pyro-lunet guide, in a plain PyTorch loop: every rank
seeds Pyro identically (the guide's draws are then the same on every rank),
walks the same global subsample indices, scores its shard with the plate's
full ``size`` (Pyro scales the likelihood by ``size / len(subsample)``) and
averages the gradients before the step::

    pyro.set_rng_seed(0)                       # the same seed on every rank
    guide(data, idx_all[:1])                   # builds the guide's parameters
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    elbo = pyro.infer.Trace_ELBO()
    for idx in global_batches:                 # the same on every rank
        loss = elbo.differentiable_loss(model, guide, data, shard(idx))
        optimizer.zero_grad()
        loss.backward()
        all_reduce_gradients(guide.parameters())   # the average over ranks
        optimizer.step()

where ``model`` holds ``pyro.plate("data", len(data), subsample=idx)``. With
the global batch size a multiple of the world size this is the single-process
loop on the global batches, up to rounding (tested). Layers that maintain
themselves (rank-one merges) do so identically on every rank.

Everything here works without a process group too (one rank, rank 0), so code
written with it runs unchanged in a single process.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveError",
    "all_reduce_gradients",
    "all_reduce_sum",
    "broadcast_module",
    "check_replicas",
    "check_same",
    "init_from_env",
    "is_initialized",
    "is_main_process",
    "launch",
    "launch_command",
    "mean_nll",
    "print_main",
    "process_group_from_env",
    "rank",
    "shard",
    "shard_bounds",
    "world_size",
    "write_on_main",
]


class CollectiveError(RuntimeError):
    """A collective operation failed or timed out: another rank has most likely failed."""


# ----------------------------------------------------------------- the group
def is_initialized() -> bool:
    """Whether a default process group is initialized (data-parallel mode)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is rank 0 (always, without a process group): the one that prints and writes."""
    return rank() == 0


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initializes the default process group from a launcher's environment, if there is one.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
    ``MASTER_ADDR``/``MASTER_PORT``; without them (a plain single process) this
    does nothing. ``backend`` defaults to ``nccl`` when CUDA is available and
    ``gloo`` otherwise; with ``nccl`` the process's GPU is ``LOCAL_RANK``.

    :returns: whether this call initialized a group (``False`` when there is no
        launcher or a group already exists).
    """
    if is_initialized() or "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextmanager
def process_group_from_env(backend: str | None = None, timeout_s: float = 1800.0):
    """:func:`init_from_env` for a block, the group destroyed at its end if this started it.

    What a program's entry point wraps its work in, e.g. ``pyro-lunet fit`` under
    ``torchrun``; without a launcher the block runs as one process.
    """
    started = init_from_env(backend, timeout_s)
    try:
        yield
    finally:
        if started and is_initialized():
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where the backend wants tensors: the current GPU for ``nccl``, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, run, *args, **kwargs):
    try:
        return run(*args, **kwargs)
    except RuntimeError as error:  # DistBackendError and gloo's errors are RuntimeErrors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: {what} failed ({first}); another rank has most "
            "likely failed or exited: see its error"
        ) from error


# ------------------------------------------------------------------ sharding
def shard_bounds(num_rows: int, rank_: int | None = None, world: int | None = None):
    """``(start, stop)`` of ``rank_``'s contiguous share of ``num_rows`` rows.

    Shares differ by at most one row; rank r takes rows ``r N // W`` up to
    ``(r + 1) N // W``.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank_}")
    return rank_ * num_rows // world, (rank_ + 1) * num_rows // world


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global ``batch``'s rows (all of it without a group).

    Every rank must pass the same global batch; the shares of all ranks, in
    rank order, are the batch.
    """
    start, stop = shard_bounds(batch.shape[0])
    return batch[start:stop]


# --------------------------------------------------------------- reductions
def all_reduce_gradients(
    parameters: Iterable[torch.Tensor], average: bool = True, extra: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Sums (``average``: averages) the gradients of ``parameters`` over the ranks, in place.

    One flattened bucket per dtype and device, so one collective each; a
    no-op without a process group. Parameters without a gradient are left
    out, and must be the same on every rank (they are, for the same model and
    loss). ``extra``, a tensor (e.g. the step's loss), is reduced in the same
    collective as the gradients of its dtype and device, and returned reduced
    (summed, or averaged with ``average``); ``None`` comes back as ``None``.

    :raises CollectiveError: when the collective fails (another rank failed).
    """
    if not is_initialized():
        return extra
    unique = {id(p): p for p in parameters}.values()  # a parameter listed twice counts once
    grads = [p.grad for p in unique if p.grad is not None]
    world = world_size()
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    key = None if extra is None else (extra.dtype, extra.device)
    if key is not None:
        buckets.setdefault(key, [])
    reduced_extra = None
    device = _comm_device()
    for (dtype, where), members in buckets.items():
        parts = [g.reshape(-1) for g in members]
        if (dtype, where) == key:
            parts.append(extra.detach().reshape(-1))
        flat = torch.cat(parts).to(device)
        _collective("the gradient all-reduce", dist.all_reduce, flat)
        if average:
            flat.div_(world)
        flat = flat.to(where)
        offset = 0
        for grad in members:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        if (dtype, where) == key:
            reduced_extra = flat[offset:].view_as(extra)
    return reduced_extra


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, as a new tensor (``tensor`` itself without a group)."""
    if not is_initialized():
        return tensor
    flat = tensor.detach().to(_comm_device(), copy=True)
    _collective("a sum over the ranks", dist.all_reduce, flat)
    return flat.to(tensor.device)


def mean_nll(model, rows: torch.Tensor, chunk: int = 4096) -> float:
    """Mean ``-log p`` of ``rows`` over all ranks, each scoring its shard (eval mode, no grad).

    Every rank passes the same ``rows``; without a group this is
    :func:`pyro_lunet._scoring.mean_nll`.
    """
    from ._scoring import log_prob_in_chunks
    from ._scoring import mean_nll as single

    if not is_initialized():
        return single(model, rows, chunk)
    part = shard(rows)
    # A rank without rows scores the first row with weight zero.
    weight = 1.0 if part.shape[0] else 0.0
    total = -log_prob_in_chunks(model, part if weight else rows[:1], chunk).sum() * weight
    return (all_reduce_sum(total) / rows.shape[0]).item()


# ------------------------------------------------------ replicas identical
def _state(module: torch.nn.Module) -> dict:
    state = dict(module.state_dict())
    # Counters outside state_dict that decide what a replica computes next.
    for name, sub in module.named_modules():
        tracker = getattr(sub, "_tracker", None)
        steps = getattr(tracker, "steps", None)
        if isinstance(steps, int):
            state[f"{name}._tracker.steps"] = torch.tensor(steps, dtype=torch.int64)
    return state


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksums(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Four int64 checksums a tensor, of its bits: the sums of the low and of the high 32 bits
    of every element, plain and weighted by position (1 to 7, cyclic). Exact: one element
    differing in one bit changes them."""
    sums = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(device)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.int8)
        elif flat.is_floating_point():
            flat = flat.view(_SAME_WIDTH_INT[flat.element_size()])
        wide = flat.to(torch.int64)
        low, high = wide & 0xFFFFFFFF, (wide >> 32) & 0xFFFFFFFF
        weights = torch.arange(wide.numel(), device=device) % 7 + 1
        sums.append(torch.stack([low.sum(), high.sum(), (low * weights).sum(),
                                 (high * weights).sum()]))  # fmt: skip
    if not sums:
        return torch.zeros(0, 4, dtype=torch.int64, device=device)
    return torch.stack(sums)


def _disagree(values: torch.Tensor, what: str) -> torch.Tensor:
    """A bool mask of the rows of ``values`` (int64) whose entries differ between ranks."""
    both = torch.cat([values.reshape(-1), ~values.reshape(-1)])  # ~x = -1 - x: max of ~x is ~min
    _collective(f"the consistency check of {what}", dist.all_reduce, both, op=dist.ReduceOp.MAX)
    high, low = both[: values.numel()], ~both[values.numel() :]
    return (high != low).reshape(len(values), -1).any(dim=1)


def _check_structure(state: dict, what: str) -> None:
    names = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in state.items())
    signature = torch.tensor(
        [[len(state), zlib.crc32(names.encode())]], dtype=torch.int64, device=_comm_device()
    )
    if bool(_disagree(signature, what).any()):
        raise ValueError(
            f"rank {rank()} of {world_size()}: {what} differs in structure between ranks "
            f"(expected the same tensor names, shapes and dtypes on every rank; this rank holds "
            f"{len(state)} tensors); build the same model on every rank"
        )


def check_same(tensor: torch.Tensor, what: str = "the tensor") -> None:
    """Raises ``ValueError`` unless ``tensor`` is the same on every rank (e.g. the data).

    A checksum comparison: one collective and one host read. A no-op without a group.
    """
    if not is_initialized():
        return
    _check_structure({"t": tensor}, what)
    if bool(_disagree(_checksums([tensor], _comm_device()), what).any()):
        raise ValueError(
            f"rank {rank()} of {world_size()}: {what} differs between ranks; expected the same "
            "on every rank (load the same data, with the same seed, on every rank)"
        )


def check_replicas(module: torch.nn.Module, when: str = "") -> None:
    """Raises ``RuntimeError`` unless every rank holds identical parameters, buffers and counters.

    Compares checksums of every tensor of ``module.state_dict()`` (rank-one
    layers' seeds and merge counters included) and of self-normalizing
    layers' tracking counters: one collective and one host read, O(number of
    entries); cheap enough to run after every epoch. A no-op without a group.

    :param str when: words for the message, e.g. ``"after epoch 3"``.
    """
    if not is_initialized():
        return
    state = _state(module)
    _check_structure(state, "the model")
    differ = _disagree(_checksums(list(state.values()), _comm_device()), "the model")
    if bool(differ.any()):
        names = [name for name, bad in zip(state, differ.tolist()) if bad]
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise RuntimeError(
            f"rank {rank()} of {world_size()}: the replicas diverged{' ' + when if when else ''}: "
            f"{len(names)} entries differ between ranks ({listed}); expected identical "
            "parameters, buffers and counters on every rank"
        )


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Makes every rank's ``module`` a copy of rank ``src``'s: parameters, buffers, extra state
    (rank-one seeds and counters) and self-normalizing tracking counters, as DDP does at its start.

    The module must have the same structure on every rank (checked: ``ValueError``
    otherwise). One broadcast a tensor. A no-op without a group.
    """
    if not is_initialized():
        return
    state = _state(module)
    _check_structure(state, "the model")
    device = _comm_device()
    received = {}
    for name, value in state.items():
        buffer = value.detach().to(device, copy=True)
        _collective(f"the broadcast of {name}", dist.broadcast, buffer, src=src)
        received[name] = buffer.to(value.device)
    counters = {k: received.pop(k) for k in list(received) if k.endswith("._tracker.steps")}
    module.load_state_dict(received)
    modules = dict(module.named_modules())
    for key, value in counters.items():
        modules[key.removesuffix("._tracker.steps")]._tracker.steps = int(value)


def write_on_main(write: Callable[[], object]) -> None:
    """Runs ``write()`` on rank 0 only, then lets every rank go on once it is done.

    The other ranks wait for rank 0 (so they may read what it wrote) and
    raise ``RuntimeError`` when its ``write()`` raised, which rank 0 itself
    re-raises: no rank waits for a write that failed. Without a group this is
    ``write()``.
    """
    if not is_initialized():
        write()
        return
    error = None
    if is_main_process():
        try:
            write()
        except Exception as caught:  # re-raised below, once the others know
            error = caught
    failed = torch.tensor([0.0 if error is None else 1.0], device=_comm_device())
    _collective("waiting for rank 0's write", dist.broadcast, failed, src=0)
    if error is not None:
        raise error
    if bool(failed.item()):
        raise RuntimeError(
            f"rank {rank()} of {world_size()}: rank 0 failed to write; see its error"
        )


# ------------------------------------------------------------- fit_density
def sharded_loss(model, batch: torch.Tensor, modules: list[torch.nn.Module], penalty_fn):
    """``(loss, nll_sum)`` of this rank's share of a global batch, for :func:`fit_density`.

    ``loss`` = shard's summed NLL / global batch size + penalty / world size,
    so the gradients summed over the ranks are those of the single-process
    loss on the global batch. A rank without rows scores the batch's first row
    with weight zero (every rank runs every layer the same number of times).
    ``nll_sum`` is the shard's detached summed NLL.
    """
    part = shard(batch)
    weight = 1.0 if part.shape[0] else 0.0
    nll_sum = -model.log_prob(part if weight else batch[:1]).sum() * weight
    loss = nll_sum / batch.shape[0]
    if modules:
        loss = loss + penalty_fn(modules) / world_size()
    return loss, nll_sum.detach()


# ------------------------------------------------------------------ launching
def launch_command(argv: Sequence[str], nproc: int, module: str = "pyro_lunet") -> list[str]:
    """The command :func:`launch` runs: ``python -m torch.distributed.run --nproc-per-node
    nproc -m module *argv``, for one machine."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv must be a list of strings, got {argv!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", module, *argv]  # fmt: skip


def launch(argv: Sequence[str], nproc: int, module: str = "pyro_lunet") -> int:
    """Runs ``python -m module *argv`` in ``nproc`` processes on this machine, through
    ``torch.distributed.run`` (``torchrun``), and returns its exit status.

    ``torchrun`` gives each process its rank and a rendezvous (``--standalone``:
    a free local port), and when one process fails it stops the others. For
    several machines, run ``torchrun`` yourself (see the module's docstring).
    """
    return subprocess.call(launch_command(argv, nproc, module))
