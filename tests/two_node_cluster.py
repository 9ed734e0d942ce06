"""A two-node Ray cluster on this machine for tests, run as its own process: `python tests/two_node_cluster.py`.

Ray's test utilities (`ray.cluster_utils.Cluster`) start a head and a second node, each with one CPU, all on
127.0.0.1 (the `ray start` CLI refuses a second node in loopback-only mode). The process prints the cluster's
address and the second node's id, then follows commands on stdin:
  drain   drains the second node for preemption, as a cloud's spot reclaim notice does (the GCS call that
          `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` makes, without starting a CLI process: under
          load that start took seconds, and the run could finish before the node was lost), prints `drained`;
  remove  SIGKILLs every process of the second node (a lost spot instance), prints `removed`;
end of input shuts the cluster down.
"""

from __future__ import annotations

import os
import socket
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback; read when ray is imported

from ray.cluster_utils import Cluster  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    temp_dir = sys.argv[1]
    port = _free_port()
    # Ray's test cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster (by default /tmp/ray, which a
    # machine where Ray never ran does not have, and which a user's own cluster uses): keep it in the test's folder.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    # Inherited by every process of the cluster: Ray's own actors find their cluster by it (see conftest).
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir,
                                                                "gcs_server_port": port})
    second = cluster.add_node(num_cpus=1, temp_dir=temp_dir)
    print(cluster.address, second.node_id, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "drain":
                import time

                from ray._raylet import GcsClient
                from ray.core.generated import autoscaler_pb2

                accepted, why = GcsClient(address=cluster.gcs_address).drain_node(
                    second.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                    "spot reclaim", time.time_ns() // 1_000_000 + 60_000)
                print("drained" if accepted else f"refused {why}", flush=True)
            elif line.strip() == "remove":
                cluster.remove_node(second, allow_graceful=False)
                print("removed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
