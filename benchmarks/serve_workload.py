"""Workloads of `pdserve bench serve`: seeded length distributions, arrivals and prompts.

Everything here is a pure function of its seed, so two layouts benchmarked in one run
(or two runs on two machines) get exactly the same requests at the same offsets.

    LengthDist.parse("512")                 fixed
    LengthDist.parse("uniform:256:1024")    uniform on [256, 1024]
    LengthDist.parse("chat:128:2048")       long-tailed, chat-like: lognormal with median
                                            128 and sigma 1 (p90 ~ 3.6x, p99 ~ 10x the
                                            median), clipped to [4, 2048]
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from benchmarks.bench_util import WORDS

CHAT_SIGMA = 1.0  # lognormal shape of the chat-like distribution
CHAT_MIN = 4


@dataclass(frozen=True)
class LengthDist:
    kind: str  # fixed | uniform | chat
    lo: int  # fixed: the length; uniform: low end; chat: the median
    hi: int = 0  # uniform: high end (inclusive); chat: the clip

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.strip().split(":")
        try:
            if len(parts) == 1 or (parts[0] == "fixed" and len(parts) == 2):
                dist = cls("fixed", int(parts[-1]))
            elif parts[0] in ("uniform", "chat") and len(parts) == 3:
                dist = cls(parts[0], int(parts[1]), int(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"length {text!r}: expected N, fixed:N, uniform:LO:HI or "
                             f"chat:MEDIAN:MAX") from None
        if dist.lo < 1 or (dist.kind != "fixed" and dist.hi < dist.lo):
            raise ValueError(f"length {text!r}: lengths must be >= 1 and LO <= HI")
        return dist

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.kind == "fixed":
            return [self.lo] * n
        if self.kind == "uniform":
            return [int(x) for x in rng.integers(self.lo, self.hi + 1, size=n)]
        raw = rng.lognormal(math.log(self.lo), CHAT_SIGMA, size=n)
        return [int(x) for x in np.clip(np.rint(raw), min(CHAT_MIN, self.hi), self.hi)]

    def __str__(self) -> str:
        return str(self.lo) if self.kind == "fixed" else f"{self.kind}:{self.lo}:{self.hi}"


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthDist
    output: LengthDist
    rates: tuple[float, ...]  # default offered loads (requests/s) of the sweep
    num_requests: int  # default requests per rate


def _w(name: str, prompt: str, output: str, rates: tuple[float, ...], n: int) -> Workload:
    return Workload(name, LengthDist.parse(prompt), LengthDist.parse(output), rates, n)


# Sized for the 2-core CPU box and the default model (~350-450 prompt tok/s and ~45-60 ms
# per decode step per 1-thread worker, with the CPU kernels): the higher rate of each
# workload loads one worker of a kind near its capacity; a few minutes for the comparison.
PRESETS = {
    # long prompts, few output tokens: prefill compute dominates
    "prefill-heavy": _w("prefill-heavy", "uniform:256:512", "12", (0.6, 1.0), 12),
    # short prompts, long outputs: decode steps dominate
    "decode-heavy": _w("decode-heavy", "uniform:32:64", "64", (2.0, 3.5), 16),
    # a chat service: long-tailed prompts and answers
    "chat": _w("chat", "chat:128:1024", "chat:32:128", (0.5, 1.0), 16),
}
QUICK = {
    "prefill-heavy": _w("prefill-heavy", "uniform:96:160", "4", (1.0,), 4),
    "decode-heavy": _w("decode-heavy", "uniform:16:32", "12", (2.0,), 4),
    "chat": _w("chat", "chat:48:256", "chat:8:24", (1.0,), 4),
}


@dataclass(frozen=True)
class Interference:
    """The decode-interference scenario: a steady decode stream (short prompts, long outputs)
    measured alone, then again with `long_count` long prompts (short outputs) arriving among
    it, evenly spread over the stream's arrival window. Only the stream's requests count."""
    name: str
    stream: Workload  # its rates[0] is the stream's rate, num_requests its size
    long: Workload  # the long prompts; its num_requests is how many arrive
    long_start_s: float = 2.0  # no long prompt before this offset: let the stream fill up

    @property
    def stream_rate(self) -> float:
        return self.stream.rates[0]


INTERFERENCE = Interference(
    "interference",
    _w("interference-stream", "uniform:32:64", "96", (1.0,), 16),
    _w("interference-long", "uniform:1024:2048", "4", (1.0,), 3))
INTERFERENCE_QUICK = Interference(
    "interference",
    _w("interference-stream", "uniform:16:32", "24", (2.0,), 4),
    _w("interference-long", "uniform:384:512", "2", (1.0,), 2), long_start_s=0.25)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    send_at: float  # seconds after the run starts
    prompt_len: int  # tokens asked for (exact for ids; approximate for text)
    output_len: int  # max_tokens, with ignore_eos: exactly this many are generated
    prompt_token_ids: tuple[int, ...] = ()
    prompt_text: str = ""


def arrival_offsets(n: int, rate: float, rng: np.random.Generator,
                    burstiness: float = 1.0) -> list[float]:
    """Send times of `n` requests at `rate` requests/s, the first at 0. Gaps are gamma with
    shape `burstiness` and mean 1/rate: 1 is a Poisson process, < 1 burstier, > 1 more
    regular. rate = inf sends everything at once."""
    if n <= 0:
        return []
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + [float(x) for x in np.cumsum(gaps)]


def count_for_duration(duration_s: float, rate: float, rng: np.random.Generator,
                       burstiness: float = 1.0, cap: int = 100_000) -> int:
    """How many arrivals of the process fall within `duration_s` (at least 1)."""
    if math.isinf(rate):
        raise ValueError("a duration needs a finite rate")
    n, t = 1, 0.0
    while n < cap:
        t += float(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
        if t >= duration_s:
            break
        n += 1
    return n


def synth_text(rng: np.random.Generator, num_tokens: int) -> str:
    """About `num_tokens` tokens of plain English words (~1.2 tokens per word here)."""
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=max(1, round(num_tokens / 1.2)))]
    return " ".join(words).capitalize() + "."


def make_requests(workload: Workload, rate: float, seed: int, num_requests: int | None = None,
                  duration_s: float | None = None, burstiness: float = 1.0,
                  token_range: tuple[int, int] = (1000, 32000), text: bool = False
                  ) -> list[BenchRequest]:
    """The run's requests: seeded by (seed, workload, rate) only, so every layout gets the
    same ones. Prompts are random token ids in `token_range` (or random words), distinct
    per request, so the prefix cache saves nothing."""
    rate_key = int(round(rate * 1000)) if math.isfinite(rate) else 0
    key = [seed, zlib.crc32(workload.name.encode()), rate_key]
    rng = np.random.default_rng(key)
    if num_requests is None:
        if duration_s is None:
            num_requests = workload.num_requests
        else:
            num_requests = count_for_duration(duration_s, rate, np.random.default_rng(key + [1]),
                                              burstiness)
    offsets = arrival_offsets(num_requests, rate, rng, burstiness)
    prompt_lens = workload.prompt.sample(rng, num_requests)
    output_lens = workload.output.sample(rng, num_requests)
    lo, hi = token_range
    out = []
    for i, (at, plen, olen) in enumerate(zip(offsets, prompt_lens, output_lens)):
        if text:
            out.append(BenchRequest(i, at, plen, olen, prompt_text=synth_text(rng, plen)))
        else:
            ids = tuple(int(t) for t in rng.integers(lo, hi, size=plen))
            out.append(BenchRequest(i, at, plen, olen, prompt_token_ids=ids))
    return out


def make_interference_requests(scenario: Interference, seed: int, with_long: bool,
                               num_stream: int | None = None, text: bool = False
                               ) -> tuple[list[BenchRequest], int]:
    """Returns (requests, n): the stream's n requests, indices 0..n-1 and the same with or
    without the long prompts, then (with_long) the long prompts, indices n.., sent at evenly
    spaced offsets between long_start_s and the stream's last arrival."""
    stream = make_requests(scenario.stream, scenario.stream_rate, seed, num_stream, text=text)
    n = len(stream)
    if not with_long:
        return stream, n
    longs = make_requests(scenario.long, scenario.long.rates[0], seed, text=text)
    start = scenario.long_start_s
    span = max(0.0, stream[-1].send_at - start)
    return stream + [replace(r, index=n + j, send_at=start + span * (j + 0.5) / len(longs))
                     for j, r in enumerate(longs)], n
