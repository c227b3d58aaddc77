"""Process groups and worker processes: everything else in :mod:`miniinfer.distributed` starts here.

Two ways to get ``world_size`` processes that can talk:

* ``torchrun --nproc-per-node N -m miniinfer.distributed.train_demo``: torchrun starts the processes and
  sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``; each calls :func:`init_distributed`.
* :class:`WorkerPool` (tests, the chapter, ``LLM(tensor_parallel_size=N)``): spawns N processes with
  ``torch.multiprocessing`` once, each joins the group, then runs the functions it is sent, so that a
  test module pays the start-up (a Python interpreter + ``import torch`` per rank) once.

**Failures must not hang.** A collective waits for every rank; if one rank raised, the others would wait
forever. Every group is created with a ``timeout``: a collective that does not complete in time raises
in every waiting rank, and :func:`collective_error` turns that into a message that says which rank and
what to look at. The pool also gives each task a deadline and reports every rank's error at once.

On GPUs the backend is NCCL; :func:`nccl_environment` keeps NVLink multicast (NVLS) and symmetric-memory
multicast off, which some lent machines cannot set up (the job would fail at the first collective).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "nccl_environment", "free_port", "WorkerPool", "DistributedError",
           "collective_error", "rank", "world_size", "barrier"]

DEFAULT_TIMEOUT_S = 60.0
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class DistributedError(RuntimeError):
    """One or more ranks failed (the message holds each rank's error)."""


def nccl_environment() -> dict[str, str]:
    """Set (and return) the NCCL variables that keep NVLink multicast off, without overriding the user's."""
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in NCCL_ENV}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank: int | None = None, world_size: int | None = None, *, backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, master_port: int | None = None) -> tuple[int, int]:
    """Join the default process group -> (rank, world_size).

    Without arguments it reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``). ``backend`` None: NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every
    collective (see the module docstring). On NCCL each rank uses GPU ``LOCAL_RANK`` (or ``rank``).
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        nccl_environment()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def collective_error(error: BaseException, what: str = "a collective") -> DistributedError:
    """A clear error for a collective that failed or timed out (usually: another rank died first)."""
    text = f"{type(error).__name__}: {error}".strip()
    hint = ("another rank probably failed or stopped calling collectives (its own error says why); "
            "this rank waited until the process group's timeout")
    return DistributedError(f"rank {rank()}: {what} did not complete ({text.splitlines()[0][:300]}); {hint}")


# --------------------------------------------------------------------------------------------------
# A pool of spawned worker processes
# --------------------------------------------------------------------------------------------------

def _worker_main(rank_: int, world: int, port: int, backend: str, timeout_s: float, tasks, results,
                 threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        init_distributed(rank_, world, backend=backend, timeout_s=timeout_s, master_port=port)
        results.put((rank_, "ready", None))
    except BaseException as e:  # noqa: BLE001
        results.put((rank_, "error", f"rank {rank_}: could not join the process group: {e!r}"))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            results.put((rank_, "ok", value))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, with the traceback
            text = str(e).lower()
            if any(word in text for word in ("timed out", "timeout", "connection closed", "connection reset")):
                message = str(collective_error(e))  # waited on a rank that had failed
            else:
                message = f"rank {rank_}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            results.put((rank_, "error", message))
    # No destroy_process_group: after a timed-out collective it may wait on the dead peer; exiting is enough.


class WorkerPool:
    """``world_size`` spawned processes in one process group, running the functions they are sent.

        with WorkerPool(2) as pool:
            results = pool.run(my_fn, arg)      # my_fn(arg) on every rank -> [rank 0's value, rank 1's, ...]

    ``fn`` must be importable (a module-level function: it is pickled by name). A task that raises on any
    rank raises :class:`DistributedError` here with every rank's message; a task that does not finish in
    ``task_timeout_s`` kills the pool. ``timeout_s`` is the process group's collective timeout.
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout_s: float = 20.0,
                 task_timeout_s: float = 120.0, threads_per_rank: int = 1, start_timeout_s: float = 120.0):
        import torch.multiprocessing as mp

        self.world_size = world_size
        self.task_timeout_s = task_timeout_s
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=_worker_main, daemon=True,
                                   args=(r, world_size, port, backend, timeout_s, self._tasks[r], self._results,
                                         threads_per_rank))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._collect("ready", start_timeout_s)

    def _collect(self, what: str, timeout_s: float) -> list:
        values: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        import queue

        while len(values) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            try:
                r, status, value = self._results.get(timeout=max(0.1, min(remaining, 1.0)))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in values
                        and r not in errors]
                if dead or remaining <= 0:
                    self.close(force=True)
                    why = f"rank(s) {dead} exited" if dead else f"no answer within {timeout_s:.0f} s"
                    raise DistributedError(f"worker pool: {why} while waiting for {what}; errors so far: "
                                           f"{errors or 'none'}") from None
                continue
            if status == "error":
                errors[r] = value
            else:
                values[r] = value
        if errors:
            raise DistributedError("; ".join(f"[{r}] {errors[r]}" for r in sorted(errors)) +
                                   (f" (ranks {sorted(values)} succeeded)" if values else ""))
        return [values[r] for r in range(self.world_size)]

    def run(self, fn: Callable, *args, timeout_s: float | None = None, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank -> the list of return values, by rank."""
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "a task"), timeout_s or self.task_timeout_s)

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                try:
                    q.put(None)
                except Exception:  # noqa: BLE001
                    pass
            deadline = time.monotonic() + 1  # nothing to flush: a worker stuck in a group destructor is killed
            for p in self._procs:
                p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
