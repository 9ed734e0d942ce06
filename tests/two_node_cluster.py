"""A two-node Ray cluster on this machine for tests, run as its own process: `python tests/two_node_cluster.py`.

Ray's test utilities (`ray.cluster_utils.Cluster`) start a head and a second node, each with one CPU, all on
127.0.0.1 (the `ray start` CLI refuses a second node in loopback-only mode). The process prints the cluster's
address and the second node's id, then follows commands on stdin: `remove` SIGKILLs every process of the
second node (a lost spot instance) and prints `removed`; end of input shuts the cluster down.
"""

from __future__ import annotations

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback; read when ray is imported

from ray.cluster_utils import Cluster  # noqa: E402


def main() -> None:
    temp_dir = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir})
    second = cluster.add_node(num_cpus=1, temp_dir=temp_dir)
    print(cluster.address, second.node_id, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "remove":
                cluster.remove_node(second, allow_graceful=False)
                print("removed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
