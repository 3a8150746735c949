"""Run a graph on a 2-node ``ray.cluster_utils.Cluster`` and print the replicas' placement as JSON.

Started as a subprocess by ``test_multinode.py``: a driver can be connected to one Ray only, and
the test session already holds a local one.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from streamcal.graph import load_graph  # noqa: E402
from streamcal.runtime import run_graph  # noqa: E402


def main(graph_path: str) -> int:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 4}, "include_dashboard": False},
    )
    try:
        # the second raylet pretends to have a GPU: the GPU stage can only be placed there
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"node_b": 4})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="streamcal-multinode", log_to_driver=False,
                 configure_logging=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        res = run_graph(load_graph(graph_path), print_summary=False, progress=False)
        out = {
            "status": res.status,
            "problems": res.problems,
            "nodes": nodes,
            "replicas": {r["replica"]: {"node_id": r["node_id"], "endpoints": r["endpoints"],
                                        "summary": r["summary"], "lineage": r["lineage"]}
                         for r in res.reports},
            "lost": res.merged["lost"],
        }
        print("RESULT " + json.dumps(out))
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
