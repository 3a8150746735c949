"""Process groups across the replicas of one stage (``torch.distributed``), with rejoin.

A stage kind that sets ``PROCESS_GROUP = True`` (the alignment workers) gets, in its context,
the address of a rendezvous store (``ctx.group_store``, ``"host:port"`` of a
``torch.distributed.TCPStore``) that outlives its replicas: the Ray runtime serves it from a
small actor of its own (:class:`GroupStoreServer`). :class:`ReplicaGroup` forms a
``torch.distributed`` process group of the stage's replicas over it (gloo on CPU, NCCL on GPU)
and runs the collectives. It is not a parameter server: the reduction is torch's.

Failure and rejoin. A collective in which a member died fails in the survivors (gloo: the
connection to the peer is closed; a hung peer: the group's timeout). Each failure ends the
group's *generation*: the survivors bump the generation counter in the store (compare-and-set,
so several detections of one failure bump it once), form the next generation under a new key
prefix and repeat the collective. The replica that Ray restarts reads which generation its
previous incarnation belonged to (``member/<rank>``), ends it the same way, and joins the next
one at its first collective; it restores its state from what the group stored at the last
synchronisation (:meth:`ReplicaGroup.put` / :meth:`ReplicaGroup.get`: small blobs in the store).
The collective is retried, so a caller sees one result, whatever happened in between.

A group of one replica runs without ``torch.distributed`` (the collectives are the identity).
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Literal

import torch

from streamcal.errors import StreamcalError

__all__ = ["GroupStoreServer", "ReplicaGroup", "GroupError"]

log = logging.getLogger("streamcal.group")


class GroupError(StreamcalError):
    """A process group could not be formed or a collective kept failing."""


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise GroupError("this torch build has no torch.distributed (needed by stages with replicas > 1)")
    return dist


class GroupStoreServer:
    """Serves a ``TCPStore`` on ``host`` (a free port) for as long as this object lives."""

    def __init__(self, host: str = "127.0.0.1", bind_host: str | None = None) -> None:
        dist = _dist()
        self.host = host
        self._store = dist.TCPStore(bind_host or host, 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=30))
        self.port = int(self._store.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ReplicaGroup:
    """The process group of the replicas of one stage.

    Args:
        store: ``"host:port"`` of the rendezvous store (None: a group of one).
        rank, world: this replica's index and the replica count.
        backend: ``"gloo"``, ``"nccl"`` or ``"auto"`` (NCCL when CUDA is in use, else gloo).
        timeout_s: how long a rendezvous or a collective may wait for a member.
        retries: how many generations one collective may go through before giving up.
    """

    def __init__(self, store: str | None, rank: int, world: int, *,
                 backend: Literal["gloo", "nccl", "auto"] = "gloo", timeout_s: float = 120.0,
                 retries: int = 20) -> None:
        if not (0 <= rank < world):
            raise GroupError(f"ReplicaGroup: rank must be in 0..{world - 1}, got {rank}")
        if world > 1 and not store:
            raise GroupError(f"ReplicaGroup: a group of {world} replicas needs a rendezvous store "
                             "(run the graph on Ray: `streamcal run`; the in-process runner has none)")
        self.rank, self.world = rank, world
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.retries = retries
        self.generation: int | None = None  # the generation this replica belongs to
        self.reformations = 0  # generations joined after the first
        self.failures = 0  # collectives that failed (and were repeated)
        self._pg = None
        self._attempt: int | None = None
        self._store = None
        if world > 1:
            dist = _dist()
            host, _, port = store.rpartition(":")
            self._store = dist.TCPStore(host, int(port), is_master=False, timeout=self.timeout)

    # ------------------------------------------------------------------ store
    def put(self, key: str, value: bytes) -> None:
        """Keep a blob in the group's store (survives any replica); a no-op in a group of one."""
        if self._store is not None:
            self._store.set(f"data/{key}", value)

    def get(self, key: str) -> bytes | None:
        """A blob kept with :meth:`put`, or None."""
        if self._store is None or not self._store.check([f"data/{key}"]):
            return None
        return self._store.get(f"data/{key}")

    # ------------------------------------------------------------------ membership
    def _current(self) -> int:
        return int(self._store.add("gen", 0))

    def _end(self, gen: int) -> None:
        """End generation ``gen`` (idempotent: only the first of its detections bumps)."""
        self._store.compare_set("gen", str(gen), str(gen + 1))

    def _form(self) -> None:
        dist = _dist()
        if self.generation is None:  # first call in this process: was a former incarnation a member?
            key = f"member/{self.rank}"
            if self._store.check([key]):
                self._end(int(self._store.get(key).decode()))
        elif self.generation >= self._current():
            self._end(self.generation)
        gen = self._current()
        self._attempt = gen
        t0 = time.monotonic()
        prefix = dist.PrefixStore(f"g{gen}/", self._store)
        if self.backend == "gloo":
            pg = dist.ProcessGroupGloo(prefix, self.rank, self.world, self.timeout)
        else:  # pragma: no cover - needs GPUs
            pg = dist.ProcessGroupNCCL(prefix, self.rank, self.world)
        self._store.set(f"member/{self.rank}", str(gen))
        if self.generation is not None or gen > 0:
            self.reformations += 1
            log.warning("replica %d joined process-group generation %d (%.1f s)", self.rank, gen,
                        time.monotonic() - t0)
        self.generation = gen
        self._pg = pg

    # ------------------------------------------------------------------ collectives
    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the replicas (a new tensor; ``tensor`` is not changed).
        Re-forms the group and repeats the reduction when a member fails."""
        if self.world == 1:
            return tensor.clone()
        last: Exception | None = None
        for _ in range(self.retries):
            try:
                if self._pg is None:
                    self._form()
                out = tensor.clone()
                self._pg.allreduce([out]).wait()
                return out
            except RuntimeError as exc:  # a member died or timed out (gloo raises RuntimeError)
                last = exc
                self.failures += 1
                log.warning("replica %d: collective failed in generation %s (%s); re-forming the group",
                            self.rank, self.generation, str(exc).splitlines()[0][:160])
                self._pg = None
                if self._attempt is not None:
                    self._end(self._attempt)
        raise GroupError(f"replica {self.rank}: the process group failed {self.retries} times; last error: {last}")

    def close(self) -> None:
        self._pg = None
        self._store = None

    def stats(self) -> dict[str, int | str | None]:
        return {"backend": self.backend if self.world > 1 else "none", "world": self.world,
                "generation": self.generation, "reformations": self.reformations, "failures": self.failures}
