"""Pick the next token for each row of a batch.

Order (as vLLM): repetition/presence/frequency penalties -> temperature (0 means greedy argmax
of the penalised logits) -> top-k -> top-p -> min-p -> sample. Logprobs are taken from the raw
logits, before any of that. Every stage works on the whole batch at once and is skipped when no
row needs it, so the common all-greedy batch is one argmax.

A random row is sampled by inverse CDF: one uniform number per row, searched for in the running
sum of the row's kept probabilities. A seeded request draws that number from its own generator,
so its tokens depend neither on the rest of the batch nor on its place in it; and one number per
row per step is cheap, where V exponential draws per row (the Gumbel trick) cost ~25x an argmax
on CPU.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.kernels import cpu_ops
from engine.sampling_params import SamplingParams

# Below this a temperature is treated as greedy: logits / 1e-40 overflows to inf and softmax
# turns it into NaN (vLLM uses the same cut-off).
_GREEDY_BELOW = 1e-5
# top-k/top-p look at the best 64 tokens first and at 4x more for the rows whose kept set does
# not fit: a full sort of [64, 49152] costs ~40x an argmax on CPU, and nuclei are usually small.
_FIRST_CANDIDATES = 64
_GROWTH = 4


@dataclass
class SamplingState:
    """A request's sampling inputs; one per request, owned by the engine's request object."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the engine appends each sampled token
    generator: torch.Generator | None  # from make_generator(); None means the default generator


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    # manual_seed takes 64-bit values only; any Python int is a valid request seed
    generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def skip_draws(state: SamplingState, num_tokens: int) -> None:
    """Advance a seeded request's generator past `num_tokens` sampled elsewhere (the prefill
    side of a handoff), so the tokens that follow equal those of one engine doing it all.
    Must mirror `_sample`: one uniform per sampled token of a non-greedy request."""
    if state.generator is None or state.params.temperature < _GREEDY_BELOW:
        return
    torch.rand(num_tokens, generator=state.generator, device=state.generator.device)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the params.logprobs best (id, logprob), best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows that did not ask for logprobs


class Sampler:
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """logits: [B, V], any float dtype (read, never modified); row i belongs to states[i]."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
        params = [s.params for s in states]
        raw = logits
        logits = apply_penalties(logits, states)
        random_rows = [i for i, p in enumerate(params) if p.temperature >= _GREEDY_BELOW]
        if len(random_rows) == len(states):
            token_ids = _sample(logits, states)
        else:
            token_ids = greedy(logits)
            if random_rows:
                idx = _index(random_rows, logits)
                sampled = _sample(logits[idx], [states[i] for i in random_rows])
                token_ids[idx] = sampled
        ids = token_ids.tolist()
        return SamplerOutput(token_ids=ids, logprobs=_logprobs(raw, ids, params))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> int64 [B], each row's argmax (the first on ties). Exact in any dtype, so no
    upcast; float32 on CPU goes through the C++ pass (~25x torch's one-row-at-a-time argmax)."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape[1] > 0
            and logits.stride(1) == 1 and cpu_ops.available()):
        return cpu_ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    # (rows are picked with t[idx]: index_select is ~5x slower on CPU for long rows)
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _flat_slots(rows: list[int], token_lists: list[list[int]], vocab_size: int,
                device: torch.device) -> torch.Tensor:
    """Flat indices into a [B, V] tensor, one per token occurrence: row * V + token."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    owners = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    return (owners * vocab_size + tokens).to(device)


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """logits [B, V] with each row's repetition/frequency/presence penalties applied, as a new
    fp32 tensor; logits itself when no row has any.

    Penalties touch only the tokens a request has seen, so they are gathered and scattered at
    those (row, token) slots rather than computed over all of [B, V].
    """
    rep_rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    out_rows = [i for i, s in enumerate(states)
                if s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0]
    if not rep_rows and not out_rows:
        return logits
    logits = logits.to(torch.float32, copy=True)
    vocab_size, device = logits.shape[1], logits.device
    flat = logits.view(-1)

    def per_row(values: list[float]) -> torch.Tensor:  # [B]
        return torch.tensor(values, dtype=torch.float32, device=device)

    if rep_rows:
        # prompt and output tokens; a token seen twice is read before either write, so both
        # writes carry the same value
        lists = [states[i].prompt_token_ids for i in rep_rows]
        lists += [states[i].output_token_ids for i in rep_rows]
        seen = _flat_slots(rep_rows + rep_rows, lists, vocab_size, device)
        penalty = per_row([s.params.repetition_penalty for s in states])[seen // vocab_size]
        values = flat[seen]
        # dividing a positive logit and multiplying a negative one both make the token less likely
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if out_rows:
        out = _flat_slots(out_rows, [states[i].output_token_ids for i in out_rows],
                          vocab_size, device)
        frequency = per_row([s.params.frequency_penalty for s in states])
        flat.index_add_(0, out, -frequency[out // vocab_size])  # once per occurrence
        # -= by index reads every slot before writing: a repeated token is penalised once
        flat[out] -= per_row([s.params.presence_penalty for s in states])[out // vocab_size]
    return logits


def _sample(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """[R] token ids sampled from logits [R, V], none of whose rows is greedy."""
    n, vocab_size = logits.shape
    device = logits.device
    params = [s.params for s in states]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)  # fp32 whatever logits' dtype

    # one uniform per row; unseeded rows share the default generator, seeded ones use their own
    u = torch.rand(n, device=device)
    seeded = [j for j, s in enumerate(states) if s.generator is not None]
    if seeded:
        own = [torch.rand(1, generator=states[j].generator, device=device) for j in seeded]
        u[_index(seeded, u)] = torch.cat(own)

    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                         device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = None
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)

    truncated = [j for j, p in enumerate(params) if 0 < p.top_k < vocab_size or p.top_p < 1.0]
    if len(truncated) == n:
        return _sample_truncated(probs, top_k, top_p, min_p, u, _FIRST_CANDIDATES)
    if not truncated:
        return _sample_weights(probs, None, min_p, u)
    tokens = torch.empty(n, dtype=torch.long, device=device)
    cut_set = set(truncated)
    cut, whole = _index(truncated, u), _index([j for j in range(n) if j not in cut_set], u)
    cut_min_p, whole_min_p = (None, None) if min_p is None else (min_p[cut], min_p[whole])
    tokens[cut] = _sample_truncated(probs[cut], top_k[cut], top_p[cut], cut_min_p, u[cut],
                                    _FIRST_CANDIDATES)
    tokens[whole] = _sample_weights(probs[whole], None, whole_min_p, u[whole])
    return tokens


def _sample_truncated(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor | None, u: torch.Tensor, k: int) -> torch.Tensor:
    """Sample rows of probs [n, V] under top-k (V = off) and top-p, looking at the best k tokens.

    The kept set is always a prefix of the tokens sorted by probability, so the best k suffice for
    every row whose kept set is no longer than k; the other rows retry with more candidates.
    """
    vocab_size = probs.shape[1]
    k = min(k, vocab_size)
    values, ids = probs.topk(k, dim=-1)  # [n, k], best first
    rank = torch.arange(k, device=probs.device)
    keep = rank < top_k[:, None]
    kept = values * keep
    # top-p is over the top-k renormalised distribution (the whole one when top-k is off)
    mass = torch.where(top_k[:, None] <= k, kept.sum(dim=-1, keepdim=True), 1.0)
    cum = kept.cumsum(dim=-1) / mass
    before = cum - kept / mass  # mass strictly before each token
    # the smallest prefix with mass >= p: tokens with less than p before them (the best always)
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    fits = (top_k <= k) | ((top_k >= vocab_size) & (cum[:, -1] >= top_p)) | (k == vocab_size)

    def sample(rows: slice | torch.Tensor) -> torch.Tensor:
        return _sample_weights(values[rows] * keep[rows], ids[rows],
                               None if min_p is None else min_p[rows], u[rows])

    if bool(fits.all()):
        return sample(slice(None))
    tokens = torch.empty(len(u), dtype=torch.long, device=u.device)
    done, retry = fits.nonzero()[:, 0], (~fits).nonzero()[:, 0]
    tokens[done] = sample(done)
    tokens[retry] = _sample_truncated(probs[retry], top_k[retry], top_p[retry],
                                      None if min_p is None else min_p[retry], u[retry],
                                      k * _GROWTH)
    return tokens


def _sample_weights(weights: torch.Tensor, ids: torch.Tensor | None, min_p: torch.Tensor | None,
                    u: torch.Tensor) -> torch.Tensor:
    """Draw one column per row of weights [n, M] (unnormalised, >= 0; ours to modify) by inverse
    CDF at u [n] in [0, 1); map it through ids [n, M] when the columns are candidates."""
    if min_p is not None:
        # min-p keeps p >= min_p * p_max; top-k/top-p always keep the best token, so p_max is the
        # same before and after them and the ratio is unaffected by renormalisation
        best = weights.max(dim=-1, keepdim=True).values
        weights.masked_fill_(weights < min_p[:, None] * best, 0.0)
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u * total can round up to total, past every entry; the float just below total cannot
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # the first entry whose cdf exceeds target has weight > 0, so a masked token is never drawn
    pick = torch.searchsorted(cdf, target.contiguous(), right=True)  # [n, 1]
    if ids is None:
        return pick[:, 0]
    return ids.gather(1, pick)[:, 0]


def _logprobs(raw: torch.Tensor, token_ids: list[int],
              params: list[SamplingParams]) -> list[TokenLogprobs | None]:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return out
    picked = raw if len(rows) == len(params) else raw[_index(rows, raw)]
    logprobs = torch.log_softmax(picked.float(), dim=-1)  # [n, V]
    chosen_ids = _index([token_ids[i] for i in rows], raw)
    chosen = logprobs.gather(1, chosen_ids[:, None])[:, 0].tolist()
    n_top = max(params[i].logprobs or 0 for i in rows)
    top_values, top_ids = logprobs.topk(n_top, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        top = list(zip(top_ids[j][:n], top_values[j][:n]))
        out[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[j], top=top)
    return out
