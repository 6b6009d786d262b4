"""Helpers of `pdserve bench engine`: seeded prompts, memory bandwidth, subprocess runners."""
from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

# Plain English words; sentences of them tokenize like ordinary text (~1.2 tokens a word).
WORDS = """the of and to in is was that for it with as on be at by this had not are but from or
have an they which one you were her all she there would their we him been has when who will more
no if out so said what up its about into than them can only other new some could time these two
may then do first any my now such like our over man me even most made after also did many before
must through back years where much your way well down should because each just those people how
too little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go
came right used take three small house river water light night city road market garden window
morning evening story letter paper number answer music table winter summer village mountain ship
train doctor teacher friend mother father child family question reason problem system program
question result example idea moment service power money company kind head hand eye side part
place case point fact group government country""".split()


def synth_prompt(encode: Callable[[str], list[int]], rng: random.Random, num_tokens: int) -> list[int]:
    """A deterministic prompt of exactly `num_tokens` ids: seeded sentences of common words."""
    ids: list[int] = []
    while len(ids) < num_tokens:
        sentences = []
        for _ in range(max(1, (num_tokens - len(ids)) // 8 + 1)):
            words = rng.choices(WORDS, k=rng.randint(6, 14))
            sentences.append(" ".join(words).capitalize() + ".")
        ids += encode((" " if ids else "") + " ".join(sentences))
    return ids[:num_tokens]


def make_spec(encode: Callable[[str], list[int]], sizes: dict, seed: int = 1234) -> dict:
    """Every prompt of one bench run, as token ids. Lists hold distinct prompts (one per use) so
    no engine gets a prefix-cache hit from an earlier measurement."""
    rng = random.Random(seed)
    lo, hi = sizes["prompt_len"]
    reps = sizes["repeats"]
    return {
        "warmup": [synth_prompt(encode, rng, 16) for _ in range(2)],
        "offline": [synth_prompt(encode, rng, rng.randint(lo, hi)) for _ in range(sizes["num_prompts"])],
        # one more batch of fresh prompts per further repeat: offline throughput is the best run
        "offline_repeats": [[synth_prompt(encode, rng, rng.randint(lo, hi))
                             for _ in range(sizes["num_prompts"])] for _ in range(reps - 1)],
        # the vLLM runner needs 2 per repeat (1-token and N-token runs)
        "single": [synth_prompt(encode, rng, sizes["single_prompt_len"]) for _ in range(2 * reps)],
        "prefill": {str(n): [synth_prompt(encode, rng, n) for _ in range(reps)]
                    for n in sizes["prefill_lens"]},
    }


def best_offline_run(runs: list[dict]) -> dict:
    """The fastest of an engine's offline runs (one per prompt batch of the spec), with every
    run's tokens/s; first_tokens stay the first batch's, the one greedy agreement compares."""
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "first_tokens": runs[0]["first_tokens"],
            "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> dict:
    """Best-of-`repeats` GB/s of a large fp32 tensor copy (bytes read + written) and of a sum
    (bytes read), with torch's current thread pool."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    copy_s = read_s = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        copy_s = min(copy_s, time.perf_counter() - t)
        t = time.perf_counter()
        float(a.sum())
        read_s = min(read_s, time.perf_counter() - t)
    return {"copy_gbps": 2 * nbytes / copy_s / 1e9, "read_gbps": nbytes / read_s / 1e9,
            "buffer_mib": nbytes >> 20}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def agreement(ours: list[list[int]], theirs: list[list[int]], k: int = 8) -> float | None:
    """Fraction of prompts whose first k greedy tokens are identical in both engines."""
    pairs = [(a[:k], b[:k]) for a, b in zip(ours, theirs) if len(a) >= k and len(b) >= k]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


class RunnerError(RuntimeError):
    pass


def run_json(cmd: Sequence[str], runner: str, timeout: float, log_path: Path,
             env: dict[str, str] | None = None) -> dict:
    """Runs `cmd` in its own process group, stderr to `log_path`; returns the last stdout line
    that is a JSON object with "runner": `runner`. On timeout or exit, whatever is left of the
    group (e.g. vLLM's engine-core process) is killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise RunnerError(f"timed out after {timeout:.0f} s (log: {log_path})") from None
        finally:
            _kill_group(proc.pid)
    if proc.returncode != 0:
        raise RunnerError(f"exit status {proc.returncode}: {_tail(log_path)} (log: {log_path})")
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("runner") == runner:
                return obj
    raise RunnerError(f"printed no JSON result line (log: {log_path})")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-600:]


@contextmanager
def env_set(**values: str | None) -> Iterator[None]:
    """Sets (a value) or removes (None) environment variables for the block, then puts back what
    was there."""
    before = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def child_env(threads: int, keep_pythonpath: bool) -> dict[str, str]:
    """Environment of a runner: the thread count pinned, PYTHONPATH only for our own venv."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not keep_pythonpath:
        env.pop("PYTHONPATH", None)
    return env


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])
