"""Scale-out on torch.distributed: rank detection, the process group, sharding, rank-0 merges.

The workbench never runs its own cluster machinery. It runs under `torchrun` (or `accelerate
launch`, or anything else that exports the same variables) and uses torch.distributed: NCCL
between GPUs, gloo between CPU processes. Every rank runs the same command; the launcher sets

    RANK, WORLD_SIZE              global rank and number of processes
    LOCAL_RANK, LOCAL_WORLD_SIZE  rank and process count on this machine (picks the GPU)
    MASTER_ADDR, MASTER_PORT      where rank 0's rendezvous store listens

and this module turns them into a process group (`session`). With WORLD_SIZE unset or 1 every
helper here is a no-op that costs nothing, so the single-process code path is the same code.

Rules that keep a distributed run identical to a single-process one:
- Work is split into the SAME units a single process uses (extraction shards, ensemble members,
  attribution rows), contiguously by rank (`shard_range`), so merging in rank order reproduces
  the single-process order.
- Only rank 0 writes shared files (manifest, index.json, merged tables); the others write only
  files that carry their own shard or member range in the name.
- A failure on any rank becomes a failure on every rank (`all_ranks`, `on_main`) instead of a
  hang in the next collective: ranks exchange their outcome at each synchronisation point.

The run directory must be visible to every rank at the same path (one machine, or a shared
file system across machines); `check_shared_dir` verifies this before any work starts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import secrets
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

log = logging.getLogger("sae_cxr.distributed")

T = TypeVar("T")

TIMEOUT_ENV = "SAE_CXR_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600
"""How long a rank may wait for the others at a synchronisation point. Ranks wait for the slowest
one at the end of every distributed stage, and for rank 0 while it runs a single-process stage
(e.g. the classifier) inside a distributed pipeline, so this is hours rather than torch's default
10 minutes. A rank that dies is caught by torchrun, which stops the others, so a long timeout does
not turn a crash into a long hang."""


class DistributedError(RuntimeError):
    """A distributed launch that is misconfigured, or a rank that failed while the others waited."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process (from the environment, before any process group)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: str | None

    @property
    def launched(self) -> bool:
        """True when this process is one of several (a process group is needed)."""
        return self.world_size > 1


def _int_env(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer; it is set by the launcher "
                               "(torchrun): unset it, or launch with torchrun") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read and check the launcher's variables; raise with a fix when they are inconsistent."""
    env = os.environ if environ is None else environ
    world = _int_env(env, "WORLD_SIZE", 1)
    rank = _int_env(env, "RANK", None)
    assert world is not None
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
    if world > 1 and rank is None:
        raise DistributedError(f"WORLD_SIZE={world} is set but RANK is not: launch with "
                               "`torchrun --nproc_per_node N -m sae_cxr.cli ...`, which sets both")
    rank = 0 if rank is None else rank
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world}): every process of "
                               "one job must get the same WORLD_SIZE and a distinct RANK below it; check "
                               "--nnodes x --nproc_per_node and --node_rank on every machine")
    local_world = _int_env(env, "LOCAL_WORLD_SIZE", None)
    local_rank = _int_env(env, "LOCAL_RANK", None)
    if local_rank is None:
        local_rank = rank if local_world is None else rank % local_world
    if local_world is None:
        local_world = world
    if not 0 <= local_rank < max(local_world, 1):
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside 0..LOCAL_WORLD_SIZE-1 "
                               f"(LOCAL_WORLD_SIZE={local_world})")
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world > 1 and (not addr or not port):
        raise DistributedError(
            f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set, so the ranks cannot find each other: "
            "launch with torchrun (it sets them; across machines pass --rdzv-endpoint HOST:PORT or "
            "--master-addr/--master-port), or export MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port>")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                     master_addr=addr, master_port=port)


# -- the process group ----------------------------------------------------------------------------

def available() -> bool:
    return torch.distributed.is_available()


def is_initialized() -> bool:
    return available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the only rank that writes the manifest and the merged outputs."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def local_rank() -> int:
    """Rank on this machine (0 without a process group): which GPU this rank uses."""
    return launch_env().local_rank if is_initialized() else 0


def local_world_size() -> int:
    """Ranks on this machine: they share its cores and its data loading."""
    return launch_env().local_world_size if is_initialized() else 1


def backend() -> str | None:
    return str(torch.distributed.get_backend()) if is_initialized() else None


def default_backend() -> str:
    """NCCL when this process has a GPU and NCCL is built in, else gloo (CPU tensors)."""
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "nccl"
    return "gloo"


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            v = float(raw)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds") from None
        if v <= 0:
            raise DistributedError(f"{TIMEOUT_ENV}={raw!r} must be positive")
        return v
    return float(DEFAULT_TIMEOUT_S)


def init(backend_name: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Join the process group described by the launcher's variables; True if this call created it.

    A single process (WORLD_SIZE unset or 1) creates nothing. NCCL needs one GPU per local rank:
    the rank's device is set BEFORE the group exists so that NCCL and the object collectives use
    cuda:LOCAL_RANK rather than all piling onto cuda:0. (The NCCL path is written to the torch
    documentation but has not been run here: the development machine has no GPU.)
    """
    env = launch_env(environ)
    if not env.launched or is_initialized():
        return False
    if not available():
        raise DistributedError("this torch build has no torch.distributed; install a torch wheel with it")
    name = default_backend() if backend_name == "auto" else backend_name
    if name not in ("gloo", "nccl"):
        raise DistributedError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend_name!r}")
    if name == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("backend 'nccl' needs CUDA GPUs; on CPUs use gloo (the default without a GPU)")
        n_gpu = torch.cuda.device_count()
        if env.local_rank >= n_gpu:
            raise DistributedError(f"LOCAL_RANK={env.local_rank} but this machine has {n_gpu} GPU(s): launch at most "
                                   f"--nproc_per_node {n_gpu} here (one process per GPU)")
        torch.cuda.set_device(env.local_rank)
    try:
        torch.distributed.init_process_group(backend=name, init_method="env://",
                                             timeout=_dt.timedelta(seconds=timeout_s()))
    except Exception as e:  # DistNetworkError, DistStoreError, RuntimeError: all mean no rendezvous
        raise DistributedError(
            f"rank {env.rank} of {env.world_size} could not join the process group at "
            f"{env.master_addr}:{env.master_port} ({type(e).__name__}: {e}). Check that every machine runs the same "
            "torchrun command with the same --nnodes, --nproc_per_node and rendezvous endpoint, that the port is "
            "reachable from every machine, and (gloo across machines) GLOO_SOCKET_IFNAME names the right "
            "network interface") from e
    log.info("rank %d/%d joined the %s process group (local rank %d on %s)", env.rank, env.world_size, name,
             env.local_rank, socket.gethostname())
    return True


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(backend_name: str = "auto") -> Iterator[LaunchEnv]:
    """Join the launcher's process group for the duration of a command (no-op for one process)."""
    created = init(backend_name)
    try:
        yield launch_env()
    finally:
        if created:
            destroy()


def device(requested: str) -> torch.device:
    """The torch device of this rank for a requested one: "auto"/"cuda" means cuda:LOCAL_RANK when
    several ranks share a machine (each rank its own GPU), an explicit "cuda:N" is kept as given."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        n = torch.cuda.device_count()
        lr = local_rank()
        if lr >= n:
            raise DistributedError(f"local rank {lr} has no GPU of its own ({n} on this machine): launch at most "
                                   f"--nproc_per_node {n} here, or pass --device cpu")
        return torch.device("cuda", lr)
    return dev


# -- sharding ---------------------------------------------------------------------------------------

def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items; shares differ by at most one item
    and concatenate, in rank order, to 0..n-1 (so merging in rank order restores the order)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise DistributedError(f"rank {r} is not in a world of {w}")
    if n < 0:
        raise ValueError(f"cannot shard {n} items")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> Sequence[T]:
    """This rank's contiguous share of `items` (see shard_range)."""
    a, b = shard_range(len(items), rank_, world)
    return items[a:b]


# -- collectives ------------------------------------------------------------------------------------

def barrier() -> None:
    if not is_distributed():
        return
    if backend() == "nccl":
        torch.distributed.barrier(device_ids=[local_rank()])
    else:
        torch.distributed.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (small objects: summaries, flags)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather(obj: Any) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank (what the others pass is ignored)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _describe(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {err}{where}"


def sync_errors(what: str, err: BaseException | None) -> None:
    """Collective: every rank reports its outcome of `what`; if any rank failed, every rank raises.

    The failing rank re-raises its own exception; the others raise a DistributedError that names
    the failed rank(s) and their errors. Doubles as a barrier.
    """
    if not is_distributed():
        if err is not None:
            raise err
        return
    host = socket.gethostname()
    outcomes = all_gather(None if err is None else f"{_describe(err)} [host {host}]")
    if err is not None:
        raise err
    failed = [(r, msg) for r, msg in enumerate(outcomes) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {len(outcomes)} ranks ({detail}); "
                               "this rank stopped with them. Fix the error above and rerun the same command: "
                               "finished shards and checkpoints are kept")


@contextlib.contextmanager
def all_ranks(what: str) -> Iterator[None]:
    """Run the body on every rank, then synchronise: raise on every rank if the body failed on any."""
    try:
        yield
    except Exception as e:
        sync_errors(what, e)
        raise
    sync_errors(what, None)


def on_main(fn: Callable[..., T], *args: Any, what: str = "", **kwargs: Any) -> T:
    """Run fn on rank 0 only and return its result on every rank (broadcast; must be picklable).

    The other ranks wait. An exception on rank 0 is raised on rank 0 and, as a DistributedError
    naming it, on the others.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    result: Any = None
    err: BaseException | None = None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            err = e
    ok, payload = broadcast((err is None, result if err is None else _describe(err)))
    if err is not None:
        raise err
    if not ok:
        raise DistributedError(f"{what or getattr(fn, '__name__', 'a step')} failed on rank 0 ({payload}); "
                               "this rank stopped with it")
    return payload


def check_same(what: str, value: Any) -> None:
    """Collective: raise on every rank unless all ranks hold the same (picklable, comparable) value.

    Catches a job whose machines run different commands, configs or code versions before any of
    them writes anything.
    """
    if not is_distributed():
        return
    values = all_gather(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise DistributedError(f"ranks disagree on {what}: rank 0 has {values[0]!r} but rank(s) {odd} have "
                               f"{[values[r] for r in odd][:3]!r}. Every rank must run the same command with the "
                               "same config and code version")


def check_shared_dir(path: str | os.PathLike) -> None:
    """Collective: every rank must see `path` as the same directory (a shared file system across
    machines), since ranks write their shards there and rank 0 merges them."""
    if not is_distributed():
        return
    p = Path(path).resolve()
    token = broadcast(secrets.token_hex(8) if is_main() else None)
    probe = p / f".rank-check-{token}"
    err: BaseException | None = None
    if is_main():
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
        except OSError as e:
            err = e
    sync_errors("creating the run directory", err)
    seen = probe.exists() and probe.read_text().strip() == token
    missing = [r for r, ok in enumerate(all_gather(seen)) if not ok]
    hosts = all_gather(socket.gethostname())
    barrier()
    if is_main():
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    if missing:
        raise DistributedError(
            f"the run directory {p} is not shared: rank(s) {missing} (host(s) "
            f"{sorted({hosts[r] for r in missing})}) do not see the file rank 0 wrote there. Runs across machines "
            "need the run directory on a file system every machine mounts at the same path (NFS, Lustre, ...)")


def rank_prefix() -> str:
    """'[rank r/W] ' under a process group, '' otherwise: for messages a user must attribute."""
    return f"[rank {rank()}/{world_size()}] " if is_distributed() else ""
