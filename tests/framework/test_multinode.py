"""Two raylets on this machine (``ray.cluster_utils.Cluster``): stages pinned to different nodes by
custom and (fake) GPU resources exchange data over TCP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

GRAPH = textwrap.dedent("""
    name: two-nodes
    settings: {interface: 127.0.0.1, stall_timeout_s: 30}  # test traffic stays on loopback
    stages:
      - name: source
        kind: synthetic
        config: {messages: 400, rows: 8, seed: 3}
        resources: {custom: {node_a: 1}}
        outputs: {out: samples}
      - name: score
        kind: running_stats
        resources: {num_gpus: 1}
        inputs: {in: samples}
        outputs: {out: scored}
      - name: sink
        kind: collect
        config: {distinct_column: event}
        resources: {custom: {node_a: 1}}
        inputs: {in: scored}
""")


def test_stages_on_two_nodes_exchange_data_over_tcp(tmp_path: Path):
    graph = tmp_path / "two_nodes.yaml"
    graph.write_text(GRAPH)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("multinode_run.py")), str(graph)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["status"] == "completed", out["problems"]
    assert len(out["nodes"]) == 2
    reps = out["replicas"]
    # the GPU stage went to the node with the (fake) GPU, the others to node_a
    assert reps["score/0"]["node_id"] != reps["source/0"]["node_id"]
    assert reps["source/0"]["node_id"] == reps["sink/0"]["node_id"]
    assert set(out["nodes"]) == {reps["score/0"]["node_id"], reps["source/0"]["node_id"]}
    # the data plane is ZeroMQ over TCP between the two raylets' actors
    for key in ("source/0", "score/0"):
        for ep in reps[key]["endpoints"].values():
            assert ep.startswith("tcp://127.0.0.1:")
    sink = reps["sink/0"]["summary"]
    assert sink["messages"] == 400 and sink["distinct_event"] == 400 * 8
    assert out["lost"] == 0
