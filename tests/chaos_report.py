"""The chaos suite's report: one row per scenario, printed at the end of the pytest run
(and written to $PDSERVE_CHAOS_REPORT when set) by conftest's terminal-summary hook."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    scenario: str
    requests: int
    lost: int  # neither finished with its full output nor ended with a clear status
    leaked_blocks: int  # KV blocks still in use on any worker once the scenario settled
    reclaim_s: float  # last client reply -> every block back, nothing stuck, pools at size
    codes: str  # gRPC status codes the clients saw, with counts


ROWS: list[Row] = []


def status_codes(results) -> str:
    """'OK x8' / 'OK x40, UNAVAILABLE x10' from a list of results and gRPC errors."""
    counts = Counter(r.code().name if hasattr(r, "code") else "OK" for r in results)
    return ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))


def record(scenario: str, requests: int, lost: int, clean: dict, codes: str) -> None:
    """`clean`: the controller's status once settled, with `reclaim_s` (see assert_clean)."""
    leaked = sum(w.get("kv_blocks_used", 0) for p in clean["pools"].values() for w in p["workers"])
    ROWS.append(Row(scenario, requests, lost, leaked, clean["reclaim_s"], codes))


def render() -> str:
    head = ("| scenario | requests | lost | leaked blocks | max time to reclaim | status codes seen |\n"
            "|---|---|---|---|---|---|")
    return "\n".join([head] + [f"| {r.scenario} | {r.requests} | {r.lost} | {r.leaked_blocks} | "
                               f"{r.reclaim_s:.1f} s | {r.codes} |" for r in ROWS])
