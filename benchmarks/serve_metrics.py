"""What `pdserve bench serve` reports, computed from per-request client timings.

Definitions (times measured by the client, from the moment it sends the request):
    TTFT        first token's arrival
    TPOT        (E2E - TTFT) / (output tokens - 1): the mean gap after the first token;
                undefined (and no constraint) for a one-token answer
    ITL         every gap between two consecutive token-carrying messages
    E2E         the last message's arrival
    duration    from the run's start (first scheduled send) to the last completion
    goodput     requests meeting TTFT <= ttft_slo and TPOT <= tpot_slo, per second of
                duration; a failed request never meets them
    cost per million output tokens
                cost_per_hour / (output tokens/s * 3600) * 1e6; "at SLO" counts only the
                output tokens of the requests that met the SLOs
    decode interference
                p99 TPOT of a steady decode stream with long prompts arriving among it over
                the same stream alone (only the stream's requests count); 1.0: unaffected
Percentiles interpolate linearly between order statistics (numpy's default).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    send_at: float = 0.0  # scheduled offset in the run
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_times: list[float] = field(default_factory=list)  # per token-carrying message
    error: str | None = None  # gRPC status name and details, when it failed

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        if not self.ok or self.ttft_s is None or self.ttft_s > ttft_slo_s:
            return False
        tpot = self.tpot_s
        return tpot is None or tpot <= tpot_slo_s


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (None when there are no values)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def cost_per_mtok(cost_per_hour: float, tokens_per_s: float) -> float | None:
    """USD per million tokens at a steady `tokens_per_s`; None when nothing was produced."""
    if not tokens_per_s > 0:
        return None
    return cost_per_hour / (tokens_per_s * 3600.0) * 1e6


def goodput(records: Sequence[RequestRecord], duration_s: float, ttft_slo_s: float,
            tpot_slo_s: float) -> float:
    """Requests per second that met both SLOs."""
    if not duration_s > 0:
        return 0.0
    return sum(r.meets(ttft_slo_s, tpot_slo_s) for r in records) / duration_s


def summarize(records: Sequence[RequestRecord], duration_s: float, *, ttft_slo_s: float,
              tpot_slo_s: float, cost_per_hour: float,
              tpot_slo_grid: Sequence[float] = ()) -> dict:
    """Every figure of one run (one layout, workload and rate)."""
    ok = [r for r in records if r.ok]
    good = [r for r in ok if r.meets(ttft_slo_s, tpot_slo_s)]
    out_tokens = sum(r.output_tokens for r in ok)
    good_tokens = sum(r.output_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    d = duration_s if duration_s > 0 else math.nan
    output_tps = out_tokens / d if duration_s > 0 else 0.0
    good_tps = good_tokens / d if duration_s > 0 else 0.0
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error.split(":")[0]] = errors.get(r.error.split(":")[0], 0) + 1
    return {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": errors, "duration_s": duration_s,
        "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / d if duration_s > 0 else 0.0,
        "output_throughput": output_tps,
        "total_token_throughput": (prompt_tokens + out_tokens) / d if duration_s > 0 else 0.0,
        "ttft_s": distribution(r.ttft_s for r in ok),
        "tpot_s": distribution(r.tpot_s for r in ok),
        "itl_s": distribution(x for r in ok for x in r.itls_s),
        "e2e_s": distribution(r.e2e_s for r in ok),
        "slo": {"ttft_s": ttft_slo_s, "tpot_s": tpot_slo_s},
        "good_requests": len(good),
        "slo_attainment": len(good) / len(records) if records else 0.0,
        "goodput": goodput(records, duration_s, ttft_slo_s, tpot_slo_s),
        "good_output_throughput": good_tps,
        "goodput_by_tpot_slo": {f"{s:g}": goodput(records, duration_s, ttft_slo_s, s)
                                for s in tpot_slo_grid},
        "cost_per_hour": cost_per_hour,
        "cost_per_mtok": cost_per_mtok(cost_per_hour, output_tps),
        "cost_per_mtok_at_slo": cost_per_mtok(cost_per_hour, good_tps),
    }


def aggregate(runs: Sequence[dict], cost_per_hour: float) -> dict:
    """One layout over all its runs: totals over the summed durations."""
    duration = sum(r["duration_s"] for r in runs)
    out_tokens = sum(r["output_tokens"] for r in runs)
    good_tokens = sum(r["good_output_throughput"] * r["duration_s"] for r in runs)
    good = sum(r["good_requests"] for r in runs)
    per_s = 1.0 / duration if duration > 0 else 0.0
    return {
        "duration_s": duration, "output_tokens": out_tokens, "good_requests": good,
        "goodput": good * per_s, "output_throughput": out_tokens * per_s,
        "cost_per_hour": cost_per_hour,
        "cost_per_mtok": cost_per_mtok(cost_per_hour, out_tokens * per_s),
        "cost_per_mtok_at_slo": cost_per_mtok(cost_per_hour, good_tokens * per_s),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def interference(alone: Sequence[RequestRecord], with_long: Sequence[RequestRecord]) -> dict:
    """The decode stream's TPOT and ITL, alone and with long prompts among it, and their
    ratios (with / alone). Pass the stream's records only."""
    def figures(records: Sequence[RequestRecord]) -> tuple[dict, dict]:
        ok = [r for r in records if r.ok]
        return distribution(r.tpot_s for r in ok), distribution(x for r in ok for x in r.itls_s)

    (tpot_a, itl_a), (tpot_b, itl_b) = figures(alone), figures(with_long)
    out: dict = {}
    for name, a, b in (("tpot_p99", tpot_a["p99"], tpot_b["p99"]),
                       ("tpot_p50", tpot_a["p50"], tpot_b["p50"]),
                       ("itl_p99", itl_a["p99"], itl_b["p99"])):
        out[f"{name}_alone"], out[f"{name}_with_long_prompts"] = a, b
        out[f"{name}_interference"] = ratio(b, a)
    out["stream_failed"] = {"alone": sum(not r.ok for r in alone),
                            "with_long_prompts": sum(not r.ok for r in with_long)}
    return out
