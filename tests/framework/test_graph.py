"""Graph spec validation: every error names the stage (and line) and the field."""

from __future__ import annotations

import glob
import textwrap
from pathlib import Path

import pytest

from streamcal.errors import GraphError, ResourceError
from streamcal.graph import ClusterResources, load_graph, parse_graph, render_mermaid, render_text, validate_graph

ROOT = Path(__file__).resolve().parents[2]
CPU_ONLY = ClusterResources(({"CPU": 2.0},), "the test cluster")

GOOD = """
stages:
  - name: src
    kind: synthetic
    config: {messages: 3}
    outputs: {out: a}
  - name: mid
    kind: running_stats
    replicas: 2
    inputs: {in: a}
    outputs: {out: b}
  - name: sink
    kind: collect
    inputs: {in: b}
"""


def problems(text: str, cluster=None) -> str:
    with pytest.raises(GraphError) as e:
        validate_graph(parse_graph(textwrap.dedent(text), source="g.yaml"), cluster)
    return str(e.value)


def test_good_graph_validates_and_renders():
    spec = parse_graph(GOOD)
    plan = validate_graph(spec, CPU_ONLY)
    assert set(plan) == {"src", "mid", "sink"}
    text = render_text(spec)
    assert "[mid] kind=running_stats replicas=2" in text and "<- in: a (queue=64)" in text
    mer = render_mermaid(spec)
    assert mer.startswith("flowchart LR") and "src -->|a| mid" in mer and "mid -->|b| sink" in mer


def test_unknown_kind():
    msg = problems(GOOD.replace("kind: collect", "kind: colect"))
    assert "stage 'sink' (line 12): field 'kind': unknown stage kind 'colect'" in msg
    assert "known: " in msg and "collect" in msg


def test_duplicate_name():
    msg = problems(GOOD.replace("name: sink", "name: mid"))
    assert "stage 'mid' (line 12): duplicate stage name 'mid' (first defined at line 7)" in msg


def test_dangling_stream():
    msg = problems(GOOD.replace("inputs: {in: b}", "inputs: {in: c}"))
    assert "stage 'sink' (line 12): field 'inputs.in': stream 'c' is read but no stage writes it" in msg


def test_unread_stream():
    msg = problems(GOOD.replace("outputs: {out: b}", "outputs: {out: b2}"))
    assert "stage 'mid' (line 7): field 'outputs.out': stream 'b2' is written but never read" in msg


def test_schema_mismatch_between_writer_and_reader():
    text = """
    stages:
      - name: src
        kind: synthetic
        outputs: {out: a}
      - name: mid
        kind: running_stats
        inputs: {in: a}
        outputs: {out: b}
      - name: again
        kind: running_stats
        inputs: {in: b}
        outputs: {out: c}
      - name: sink
        kind: collect
        inputs: {in: c}
    """
    msg = problems(text)
    assert "stage 'again' (line 10): field 'inputs.in': schema mismatch on stream 'b': mid.out writes 'demo.scored'" in msg
    assert "this port reads 'demo.samples'" in msg


def test_config_field_errors_name_stage_and_field():
    msg = problems(GOOD.replace("config: {messages: 3}", "config: {messages: -1}"))
    assert "stage 'src' (line 3) config: field 'messages': must be >= 0, got -1" in msg
    msg = problems(GOOD.replace("config: {messages: 3}", "config: {mesages: 3}"))
    assert "field 'mesages': unknown field (known:" in msg
    msg = problems(GOOD.replace("config: {messages: 3}", "config: {messages: many}"))
    assert "field 'messages': must be an integer, got str 'many'" in msg


def test_unknown_port_and_unconnected_port():
    msg = problems(GOOD.replace("inputs: {in: b}", "inputs: {input: b}"))
    assert "stage 'sink' (line 12): field 'inputs': unknown port 'input' for kind 'collect' (ports: in)" in msg
    assert "stage 'sink' (line 12): field 'inputs': port 'in' is not connected to a stream" in msg


def test_structure_errors():
    msg = problems(GOOD.replace("replicas: 2", "replicas: 0"))
    assert "stage 'mid' (line 7): field 'replicas' must be an integer >= 1, got 0" in msg
    msg = problems(GOOD.replace("replicas: 2", "replica: 2"))
    assert "stage 'mid' (line 7): unknown field 'replica'" in msg
    assert "invalid graph g.yaml" in problems("stages: []")


def test_gpu_stage_without_gpu_is_an_immediate_clear_error():
    text = GOOD.replace("replicas: 2", "replicas: 2\n    resources: {num_gpus: 1}")
    with pytest.raises(ResourceError) as e:
        validate_graph(parse_graph(text), CPU_ONLY)
    assert "stage 'mid' (line 7): field 'resources.num_gpus': asks for 1 GPU(s) but the test cluster has no GPU" in str(e.value)


def test_resources_the_cluster_cannot_give():
    text = GOOD.replace("replicas: 2", "replicas: 2\n    resources: {num_cpus: 4}")
    assert "no node of the test cluster has 4 CPU" in problems(text, CPU_ONLY)
    text = GOOD.replace("replicas: 2", "replicas: 2\n    resources: {num_cpus: 1.5}")
    assert "field 'replicas': replica 1 of 2 does not fit" in problems(text, CPU_ONLY)
    text = GOOD.replace("replicas: 2", "replicas: 2\n    resources: {custom: {fpga: 1}}")
    assert "no node of the test cluster has 1 fpga" in problems(text, CPU_ONLY)
    gpu_cluster = ClusterResources(({"CPU": 2.0, "GPU": 2.0},), "the gpu cluster")
    validate_graph(parse_graph(GOOD.replace("replicas: 2", "replicas: 2\n    resources: {num_gpus: 1}")), gpu_cluster)


@pytest.mark.parametrize("value", [-5, 20, 1.5, "low", True])
def test_niceness_must_be_an_unprivileged_nice_value(value):
    text = GOOD.replace("replicas: 2", f"replicas: 2\n    resources: {{niceness: {value}}}")
    assert "resources.niceness must be an integer in [0, 19]" in problems(text)


def test_niceness_is_kept_in_the_spec():
    spec = parse_graph(GOOD.replace("replicas: 2", "replicas: 2\n    resources: {niceness: 0}"))
    assert {s.name: s.resources.niceness for s in spec.stages}["mid"] == 0
    assert all(s.resources.niceness is None for s in spec.stages if s.name != "mid")


@pytest.mark.parametrize("value", ["[]", "[1, 1]", "[-1]", "[0.5]", "1", "[true]", "'all'"])
def test_cpus_must_be_a_list_of_distinct_cpu_ids(value):
    text = GOOD.replace("replicas: 2", f"replicas: 2\n    resources: {{cpus: {value}}}")
    assert "stage 'mid' (line 7): resources.cpus must be a non-empty list of distinct CPU ids" in problems(text)


def test_cpus_are_kept_in_the_spec_and_reserved_for_the_graph():
    text = GOOD.replace("replicas: 2", "replicas: 2\n    resources: {cpus: [3, 1]}")
    text = text.replace("config: {messages: 3}", "config: {messages: 3}\n    resources: {cpus: [1]}")
    spec = parse_graph(textwrap.dedent(text))
    assert {s.name: s.resources.cpus for s in spec.stages} == {"src": (1,), "mid": (1, 3), "sink": None}
    assert spec.reserved_cpus == {1, 3}
    assert parse_graph(GOOD).reserved_cpus == frozenset()


@pytest.mark.parametrize("value", ["-1", "1.5", "true", "'fast'"])
def test_wakeup_latency_must_be_microseconds(value):
    text = GOOD.replace("replicas: 2", f"replicas: 2\n    resources: {{wakeup_latency_us: {value}}}")
    assert "stage 'mid' (line 7): resources.wakeup_latency_us must be an integer >= 0 (microseconds)" in problems(text)
    spec = parse_graph(GOOD.replace("replicas: 2", "replicas: 2\n    resources: {wakeup_latency_us: 0}"))
    assert {s.name: s.resources.wakeup_latency_us for s in spec.stages} == {"src": None, "mid": 0, "sink": None}


def test_bad_yaml_and_publish_endpoint():
    assert "not valid YAML" in problems("stages: [")
    msg = problems(GOOD + "streams:\n  b: {publish: 'http://x'}\n")
    assert "stream 'b' (line 16): field 'publish' must be an endpoint like tcp://127.0.0.1:5601" in msg


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))), ids=lambda p: Path(p).name)
def test_every_shipped_graph_validates(path):
    spec = load_graph(path)
    gpus = sum(s.resources.num_gpus * s.replicas for s in spec.stages)
    cluster = ClusterResources(({"CPU": 64.0, "GPU": max(gpus, 0.0)},), "a big node")
    validate_graph(spec, cluster)


def test_a_loop_of_streams_is_refused():
    msg = problems("""
    stages:
      - {name: w, kind: running_stats, inputs: {in: a}, outputs: {out: b}}
      - {name: x, kind: running_stats, inputs: {in: b}, outputs: {out: c}}
      - {name: y, kind: running_stats, inputs: {in: c}, outputs: {out: a}}
    """)
    assert "stage 'w': streams form a loop w -[b]-> x -[c]-> y -[a]-> w" in msg


def test_interface_must_be_an_address_or_node():
    msg = problems(GOOD + "settings: {interface: eth0}\n")
    assert "settings: field 'interface': 'eth0' is not an IP address" in msg
    validate_graph(parse_graph(GOOD + "settings: {interface: node}\n"), CPU_ONLY)
    validate_graph(parse_graph(GOOD + "settings: {interface: '::1'}\n"), CPU_ONLY)


def test_status_interval_must_be_sensible():
    assert "settings: field 'status_interval_s': must be between 0.01 and 10 seconds, got 0.0" in problems(
        GOOD + "settings: {status_interval_s: 0}\n")
    assert "'status_interval_s' (5.0 s) must be shorter than 'stall_timeout_s' (2.0 s)" in problems(
        GOOD + "settings: {status_interval_s: 5, stall_timeout_s: 2}\n")
    assert parse_graph(GOOD + "settings: {status_interval_s: 1.0}\n").settings.status_interval_s == 1.0
    assert parse_graph(GOOD).settings.status_interval_s == 0.1
