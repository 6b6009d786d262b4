"""Waits until a Ray cluster offers some resources, e.g. the GPU nodes' `prefill` and `decode`.

    python deploy/wait_for_resources.py prefill=1 decode=1 --timeout 1800 && pdserve up SPEC

For `ray up` head start commands on a cloud: the autoscaler launches the worker nodes
while the head starts, and they take minutes (boot, setup commands); `pdserve up` gives
each worker a few minutes to start, so it should begin once the nodes have joined.
Exit status 0 when they are there, 1 on timeout. RAY_ADDRESS (or --address) names the
cluster; default "auto" (the Ray instance started on this machine).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_resource(text: str) -> tuple[str, float]:
    name, sep, amount = text.partition("=")
    try:
        if not name or not sep:
            raise ValueError
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=AMOUNT, e.g. decode=1") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("resources", nargs="+", type=parse_resource, metavar="NAME=AMOUNT")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds (default 1800)")
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    want = dict(args.resources)

    import ray
    ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            have = ray.cluster_resources()
            missing = {k: v for k, v in want.items() if have.get(k, 0.0) < v}
            if not missing:
                print(f"wait_for_resources: the cluster has {want}", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(f"wait_for_resources: still missing {missing} after {args.timeout:.0f} s "
                      f"(the cluster has {have})", file=sys.stderr)
                return 1
            time.sleep(args.interval)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
