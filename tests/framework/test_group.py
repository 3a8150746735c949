"""Process groups of stage replicas (torch.distributed gloo over a TCPStore) without Ray: the
all-reduce of two processes gives the partition-weighted average, and bad set-ups are named."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from streamcal.detectors.its.align import weighted_average
from streamcal.group import GroupError, GroupStoreServer, ReplicaGroup


def _member(address: str, rank: int, theta: torch.Tensor, mu: float, out) -> None:
    torch.set_num_threads(1)
    group = ReplicaGroup(address, rank, 2, timeout_s=30)
    vec = torch.cat([theta.reshape(-1) * mu, torch.tensor([mu], dtype=torch.float64)])
    tot = group.allreduce_sum(vec)
    # as numpy: a torch tensor crosses a multiprocessing queue as a file descriptor that the
    # receiver fetches from this process, which may have ended by then
    out.put((rank, (tot[:-1] / tot[-1]).reshape(theta.shape).numpy(), group.stats()))


def test_two_processes_all_reduce_to_the_partition_weighted_average():
    server = GroupStoreServer("127.0.0.1")
    gen = torch.Generator().manual_seed(1)
    thetas = [torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    mus = [3000.0, 1000.0]  # unequal partitions
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(server.address, r, thetas[r], mus[r], out)) for r in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    expected = weighted_average(thetas, mus)
    assert not torch.allclose(expected, 0.5 * (thetas[0] + thetas[1]))  # the weights matter
    for rank, avg, stats in got:
        torch.testing.assert_close(torch.from_numpy(avg), expected, rtol=1e-14, atol=1e-14)
        assert stats["world"] == 2 and stats["generation"] == 0 and stats["failures"] == 0


def test_group_of_one_needs_no_store_and_bad_setups_are_named():
    g = ReplicaGroup(None, 0, 1)
    t = torch.arange(4.0)
    assert torch.equal(g.allreduce_sum(t), t) and g.stats()["backend"] == "none"
    with pytest.raises(GroupError, match="rendezvous store"):
        ReplicaGroup(None, 0, 2)
    with pytest.raises(GroupError, match="rank"):
        ReplicaGroup(None, 2, 2)
