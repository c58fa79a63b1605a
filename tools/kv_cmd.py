"""``tandem kv stats`` and ``tandem kv clear``: the local cluster's KV store (found in etcd)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("kv", help="the KV store: stats or clear")
    p.add_argument("action", choices=["stats", "clear"])
    p.add_argument("--etcd", default=None, help="etcd URL (default: the local cluster's)")
    p.add_argument("--cluster", default=None)
    p.add_argument("--state-dir", type=Path, default=None, help="default: $TANDEM_HOME or ~/.tandem")


def run(args: argparse.Namespace, state_dir: Path) -> int:
    from tools.local_cluster import ClusterState

    state = ClusterState.load(state_dir)
    etcd_url = args.etcd or (state.etcd_url if state else None)
    if etcd_url is None:
        print(f"tandem: no cluster recorded in {state_dir}; pass --etcd URL", file=sys.stderr)
        return 2
    cluster = args.cluster or (state.cluster if state else "default")
    return asyncio.run(_run(args.action, etcd_url, cluster))


async def _run(action: str, etcd_url: str, cluster: str) -> int:
    from kvstore.client import KVStoreClient, KVStoreUnavailable
    from services.common.registry import read_cluster

    workers, _ = await read_cluster(etcd_url, cluster)
    stores = [w for w in workers if w.role == "kvstore"]
    if not stores:
        print("tandem: no KV store is registered in this cluster", file=sys.stderr)
        return 2
    for store in stores:
        client = KVStoreClient(store.grpc_address)
        try:
            if action == "clear":
                print(f"{store.worker_id}: cleared {await client.clear()} chunk(s)")
            else:
                counters = await client.stats()
                print(f"{store.worker_id} ({store.grpc_address})")
                for name in sorted(counters):
                    print(f"  {name:<48} {counters[name]:,.0f}")
        except KVStoreUnavailable as e:
            print(f"tandem: {store.worker_id}: {e}", file=sys.stderr)
            return 1
        finally:
            await client.close()
    return 0
