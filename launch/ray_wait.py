"""Wait until a Ray cluster has N live nodes (launch/slurm/prepare.sbatch: readiness by polling, not sleeps).

    python -m longctx.launch.ray_wait --address HEAD:PORT --nodes N [--timeout SECONDS]

Exit 0 once N nodes are alive, 1 (naming what is up) when the time is spent."""
from __future__ import annotations

import argparse
import sys
import time


def alive_nodes(address: str) -> list:
    """Addresses of the live nodes, or [] while the head does not answer."""
    import socket

    from ray._raylet import GcsClient  # the GCS's own client: no driver is started, nothing to shut down
    host, port = address.rsplit(":", 1)
    try:                                    # the client retries for long against a closed port: knock first
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return []
    try:
        return [n.node_manager_address for n in GcsClient(address=address).get_all_node_info(timeout=5).values()
                if n.state == 0]            # GcsNodeInfo.ALIVE
    except Exception:                       # the head is still starting
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longctx.launch.ray_wait", description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=180)
    args = ap.parse_args(argv)
    from longctx.data.prepare import ray_auth_as_ray_start
    ray_auth_as_ray_start()
    deadline, nodes = time.time() + args.timeout, []
    while time.time() < deadline:
        nodes = alive_nodes(args.address)
        if len(nodes) >= args.nodes:
            print(f"ray_wait: {len(nodes)} nodes alive at {args.address}: {sorted(nodes)}", flush=True)
            return 0
        time.sleep(1)
    print(f"ray_wait: {len(nodes)} of {args.nodes} Ray nodes alive at {args.address} after {args.timeout:.0f}s "
          f"({sorted(nodes)}); see the `ray start` output above", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
