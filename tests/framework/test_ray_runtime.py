"""The Ray runtime on a local Ray (num_cpus=2): delivery, restarts, rejects, backpressure."""

from __future__ import annotations

import os
import textwrap
import threading
import time

import pytest

from streamcal import cpus
from streamcal.errors import ResourceError
from streamcal.graph import parse_graph
from streamcal.runtime import run_graph

pytestmark = pytest.mark.ray


def three_stage(messages: int, rows: int = 4, speed: float = 0.0, period_ms: float = 1.0, queue: int = 64) -> str:
    return textwrap.dedent(f"""
    settings: {{stall_timeout_s: 20}}
    stages:
      - name: source
        kind: synthetic
        config: {{messages: {messages}, rows: {rows}, speed: {speed}, period_ms: {period_ms}, seed: 1}}
        outputs: {{out: samples}}
      - name: score
        kind: running_stats
        replicas: 2
        inputs: {{in: samples}}
        outputs: {{out: scored}}
      - name: sink
        kind: collect
        config: {{distinct_column: event}}
        inputs: {{in: scored}}
    streams:
      samples: {{queue: {queue}}}
      scored: {{queue: {queue}}}
    """)


def rows_by_stage(result):
    return {r["stage"]: r for r in result.merged["stages"]}


def test_three_stages_two_middle_replicas_deliver_exactly_n(ray_session):
    n, rows = 3000, 4
    res = run_graph(parse_graph(three_stage(n, rows)), print_summary=False, progress=False)
    assert res.status == "completed", res.problems
    by = rows_by_stage(res)
    sink = by["sink"]["summary"][0]
    assert sink["messages"] == n
    assert sink["distinct_event"] == n * rows == sink["rows"]  # no duplicates, nothing missing
    assert sink["out_of_order"] == 0  # order kept per producer
    assert by["score"]["replicas"] == 2 and by["score"]["in_msgs"] == n
    per_replica = [r["metrics"]["inputs"]["in"]["messages"] for r in res.reports if r["metrics"]["stage"] == "score"]
    assert min(per_replica) > 0.3 * n  # load balanced
    assert res.merged["lost"] == 0 and by["sink"]["gaps"] == 0


def test_killing_a_middle_replica_counts_exactly_the_lost_messages(ray_session):
    import ray

    n, rows = 3000, 4

    def kill_later(actors):
        threading.Timer(1.0, lambda: ray.kill(actors["score/1"], no_restart=False)).start()

    res = run_graph(parse_graph(three_stage(n, rows, speed=1.0, period_ms=1.0, queue=16)),
                    print_summary=False, progress=False, on_started=kill_later)
    assert res.status == "completed", res.problems
    by = rows_by_stage(res)
    assert by["score"]["restarts"] == 1
    sink = by["sink"]["summary"][0]
    real_loss = n - sink["distinct_event"] // rows
    assert sink["distinct_event"] % rows == 0
    assert by["sink"]["lineage"]["source/0"] == {"sent": n, "reached": n - real_loss, "lost": real_loss}
    assert res.merged["lost"] == real_loss
    assert sink["messages"] == n - real_loss


def test_malformed_frames_are_rejected_with_reasons_and_the_stage_survives(ray_session):
    spec = parse_graph(textwrap.dedent("""
    settings: {max_message_bytes: 1000000}
    stages:
      - name: fuzz
        kind: fuzz
        config: {messages: 160, bad_every: 2, oversize_bytes: 1500000}
        outputs: {out: raw}
      - name: typed
        kind: running_stats
        inputs: {in: raw}
        outputs: {out: scored}
      - name: sink
        kind: collect
        inputs: {in: scored}
    """))
    res = run_graph(spec, print_summary=False, progress=False)
    assert res.status == "completed", res.problems
    by = rows_by_stage(res)
    expected = by["fuzz"]["summary"][0]["expected_rejects"]
    assert sum(expected.values()) == 80
    assert by["typed"]["rejects"] == expected
    assert by["typed"]["restarts"] == 0
    assert by["sink"]["summary"][0]["messages"] == 160


def test_gpu_request_on_a_gpu_less_cluster_fails_fast(ray_session):
    text = three_stage(10).replace("replicas: 2", "replicas: 2\n    resources: {num_gpus: 1}")
    t = time.monotonic()
    with pytest.raises(ResourceError, match="field 'resources.num_gpus': asks for 1 GPU"):
        run_graph(parse_graph(text), print_summary=False, progress=False)
    assert time.monotonic() - t < 10


def test_slow_consumer_bounds_producer_memory_and_drops_nothing(ray_session):
    """~400 kB messages into a consumer that takes 100 ms each: the producer blocks, its memory
    stays flat, nothing is dropped."""
    import ray

    n = 200
    spec = parse_graph(textwrap.dedent(f"""
    settings: {{stall_timeout_s: 60}}
    stages:
      - name: source
        kind: synthetic
        config: {{messages: {n}, rows: 20000, seed: 2}}
        outputs: {{out: samples}}
      - name: slow
        kind: collect
        config: {{delay_ms: 100, distinct_column: event}}
        inputs: {{in: samples}}
    streams:
      samples: {{queue: 2}}
    """))
    samples = []

    def watch(actors):
        def loop():
            while True:
                try:
                    st = ray.get(actors["source/0"].status.remote(), timeout=5)
                except Exception:  # the run ended
                    return
                samples.append((time.monotonic(), st["rss_mb"], st["out"]))
                if st["done"]:
                    return
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True).start()

    res = run_graph(spec, print_summary=False, progress=False, on_started=watch)
    assert res.status == "completed", res.problems
    by = rows_by_stage(res)
    assert by["slow"]["summary"][0]["messages"] == n and by["slow"]["summary"][0]["distinct_event"] == n * 20000
    assert res.merged["lost"] == 0 and by["source"]["dropped"] == 0
    assert res.elapsed_s > 15  # the run really lasted tens of seconds, paced by the consumer
    assert by["source"]["stalled_s"] > 10  # the producer was held back by backpressure
    t0 = samples[0][0]
    steady = [rss for t, rss, _ in samples if t - t0 > 3]
    assert len(steady) > 10
    # bounded: the producer's memory does not grow with the messages it has sent (80 MB of data)
    assert max(steady) - min(steady) < 25, samples
    # and it never ran far ahead of the consumer (the queue bound holds)
    ahead = [out for _, _, out in samples]
    assert ahead[len(ahead) // 2] < n * 0.75


def test_a_stuck_edge_is_named_after_the_stall_timeout(ray_session):
    """A reader that stops taking messages: after ``stall_timeout_s`` without progress the run
    ends as 'stuck' and names the edge, instead of hanging."""
    spec = parse_graph(textwrap.dedent("""
    settings: {stall_timeout_s: 2}
    stages:
      - name: source
        kind: synthetic
        config: {messages: 100, rows: 4, seed: 4}
        outputs: {out: samples}
      - name: frozen
        kind: collect
        config: {delay_ms: 6000}
        inputs: {in: samples}
    streams:
      samples: {queue: 1}
    """))
    t = time.monotonic()
    res = run_graph(spec, print_summary=False, progress=False)
    assert res.status == "stuck"
    assert any("stuck edge: source/0 -> frozen/0 (port 'in', stream 'samples')" in p for p in res.problems), res.problems
    assert time.monotonic() - t < 30


def resources_graph(source: str, sink: str = "{}", restarts: int = 3) -> str:
    """A source and a sink, each with the given ``resources`` mapping (YAML flow style)."""
    return textwrap.dedent(f"""
    stages:
      - name: source
        kind: synthetic
        restarts: {restarts}
        resources: {source}
        config: {{messages: 20, rows: 2, seed: 1}}
        outputs: {{out: samples}}
      - name: sink
        kind: collect
        resources: {sink}
        inputs: {{in: samples}}
    """)


def reported(graph: str, key: str) -> dict:
    """Run ``graph``; each stage's ``key`` from its end-of-run report."""
    res = run_graph(parse_graph(graph), print_summary=False, progress=False)
    assert res.status == "completed", res.problems
    return {r["metrics"]["stage"]: r[key] for r in res.reports}


def test_stage_niceness_is_applied_to_its_process(ray_session):
    """``resources.niceness`` sets the stage process's nice value (Ray's default for its workers,
    kept when unset, is 15: any other process on the node would preempt the stage)."""
    nice = reported(resources_graph("{niceness: 0}", "{niceness: 7}"), "niceness")
    assert nice == {"source": 0, "sink": 7}


@pytest.mark.skipif(not cpus.supported() or len(cpus.online_cpus()) < 2, reason="needs Linux and 2 CPUs")
def test_stage_cpus_pin_every_thread_and_keep_the_other_stages_off(ray_session):
    """``resources.cpus``: every thread of the stage's process (data loop, ZeroMQ, Ray) runs on the
    CPUs it names; the graph's other stages keep off them."""
    last = max(cpus.online_cpus())
    placed = reported(resources_graph(f"{{cpus: [{last}]}}"), "cpus")
    assert placed["source"] == [last]
    assert placed["sink"] and last not in placed["sink"]


def test_cpus_that_the_node_lacks_are_refused_naming_the_stage(ray_session):
    graph = resources_graph("{cpus: [4095]}", restarts=0)
    with pytest.raises(Exception) as exc:
        run_graph(parse_graph(graph), print_summary=False, progress=False)
    assert "stage 'source'" in str(exc.value) and "CPU id(s) [4095] are not online" in str(exc.value)


@pytest.mark.skipif(not os.access(cpus.PM_QOS_DEVICE, os.W_OK), reason=f"needs write access to {cpus.PM_QOS_DEVICE}")
def test_wakeup_latency_is_held_while_the_stage_runs_and_released_after(ray_session):
    """``resources.wakeup_latency_us``: the stage's process holds the node's PM QoS request while
    it runs (its report reads it back), and the kernel drops it when the process ends."""
    before = cpus.wakeup_latency_us()
    held = reported(resources_graph("{wakeup_latency_us: 7}"), "wakeup_latency_us")
    assert held["source"] == min(7, before) and held["sink"] is None
    assert cpus.wakeup_latency_us() == before


def test_status_interval_sets_how_often_the_driver_asks_the_stages(ray_session):
    """``settings.status_interval_s``: each status request runs in the stage's process (a cost on a
    latency path), so a graph can ask less often than the default 0.1 s."""
    def requests(interval: float) -> tuple[float, int]:
        graph = textwrap.dedent(f"""
        settings: {{status_interval_s: {interval}}}
        stages:
          - name: source
            kind: synthetic
            config: {{messages: 15, rows: 2, seed: 1}}
            outputs: {{out: samples}}
          - name: sink
            kind: collect
            config: {{delay_ms: 100}}
            inputs: {{in: samples}}
        """)
        t = time.monotonic()
        res = run_graph(parse_graph(graph), print_summary=False, progress=False)
        assert res.status == "completed", res.problems
        return time.monotonic() - t, next(r["status_requests"] for r in res.reports if r["metrics"]["stage"] == "sink")

    wall_slow, slow = requests(0.5)
    wall_fast, fast = requests(0.1)
    assert 1 <= slow <= wall_slow / 0.5 + 2, (wall_slow, slow)
    assert fast >= 1.5 / 0.1 * 0.5 and fast > 2 * slow, (wall_fast, fast, slow)
