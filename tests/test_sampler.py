"""Sampler tests: each expectation is computed by a plain per-row reference in float64."""
from __future__ import annotations

import random

import pytest
import torch

from engine.sampler import (Sampler, SamplingState, apply_penalties, make_generator)
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def state(params: SamplingParams, prompt: list[int] | None = None,
          output: list[int] | None = None) -> SamplingState:
    return SamplingState(params=params, prompt_token_ids=list(prompt or []),
                         output_token_ids=list(output or []),
                         generator=make_generator(params, CPU))


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n samples for one row of logits, as one batch of n identical unseeded rows."""
    logits = logits_row.expand(n, -1).contiguous()
    return torch.tensor(Sampler()(logits, [state(params) for _ in range(n)]).token_ids)


def reference_probs(logits_row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a row is sampled from, computed the plain way: sort, cut, renormalise."""
    probs = torch.softmax(logits_row.double() / p.temperature, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    kept = order[:p.top_k] if p.top_k > 0 else order
    mass = sum(probs[t].item() for t in kept)
    if p.top_p < 1.0:
        nucleus, running = [], 0.0
        for t in kept:  # smallest best-first prefix whose mass reaches top_p
            nucleus.append(t)
            running += probs[t].item() / mass
            if running >= p.top_p:
                break
        kept = nucleus
    best = probs[kept[0]].item()
    kept = [t for t in kept if probs[t].item() >= p.min_p * best]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def assert_matches(samples: torch.Tensor, expected: torch.Tensor) -> None:
    """Support within the expected one, every likely token seen, and a loose chi-square."""
    n = len(samples)
    counts = torch.bincount(samples, minlength=len(expected)).double()
    support = set(expected.nonzero()[:, 0].tolist())
    assert set(samples.tolist()) <= support
    likely = (expected * n > 30).nonzero()[:, 0].tolist()
    assert all(counts[t] > 0 for t in likely)
    if len(likely) >= 2:
        exp_counts = expected[likely] * n
        chi2 = (((counts[likely] - exp_counts) ** 2) / exp_counts).sum().item()
        df = len(likely) - 1
        assert chi2 < df + 6 * (2 * df) ** 0.5 + 10, (chi2, df)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # the default generator serves unseeded rows


def test_greedy_is_argmax_and_logits_untouched() -> None:
    logits = torch.randn(8, 1000)
    before = logits.clone()
    out = Sampler()(logits, [state(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8
    assert torch.equal(logits, before)


def test_greedy_bf16() -> None:
    logits = torch.randn(4, 500).bfloat16()
    out = Sampler()(logits, [state(SamplingParams(temperature=0.0)) for _ in range(4)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()


def test_mixed_greedy_and_random_rows() -> None:
    logits = torch.randn(6, 300) * 0.1  # flat: a random row almost never picks the argmax
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    ids = Sampler()(logits, [state(p) for p in params]).token_ids
    argmax = logits.argmax(dim=-1).tolist()
    assert [ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert [ids[i] for i in (1, 3, 5)] != [argmax[i] for i in (1, 3, 5)]


def _seeded_run(seed: int, position: str, others: list[SamplingParams],
                steps: int = 12) -> list[int]:
    """Tokens of one seeded request decoded among `others`; its logits depend only on the step."""
    vocab = 5000
    mine = state(SamplingParams(seed=seed, temperature=0.9, top_p=0.95, top_k=400,
                                repetition_penalty=1.1), prompt=[1, 2, 3])
    other_states = [state(p) for p in others]
    sampler = Sampler()
    for step in range(steps):
        row = torch.randn(vocab, generator=torch.Generator().manual_seed(step)) * 2
        batch = other_states[:]
        at = {"first": 0, "last": len(batch), "middle": len(batch) // 2}[position]
        batch.insert(at, mine)
        logits = torch.randn(len(batch), vocab) * 3
        logits[at] = row
        ids = sampler(logits, batch).token_ids
        for s, t in zip(batch, ids):
            s.output_token_ids.append(t)
    return mine.output_token_ids


def test_seed_reproducible_across_batches_and_positions() -> None:
    alone = _seeded_run(7, "first", [])
    mixes = [
        [SamplingParams(temperature=1.0)] * 3,
        [SamplingParams(temperature=0.0), SamplingParams(seed=8, top_k=5),
         SamplingParams(min_p=0.2, temperature=0.7), SamplingParams(top_p=0.5)],
        [SamplingParams(seed=7)] * 2 + [SamplingParams(top_k=3000, top_p=0.99)] * 5,
    ]
    for others in mixes:
        for position in ("first", "middle", "last"):
            assert _seeded_run(7, position, others) == alone, (others, position)
    assert _seeded_run(8, "first", []) != alone


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.randn(40)
    params = SamplingParams(top_k=5)
    samples = draw(logits, params, 4000)
    assert set(samples.tolist()) == set(logits.topk(5).indices.tolist())
    assert_matches(samples, reference_probs(logits, params))


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_matches_reference(top_p: float) -> None:
    logits = torch.randn(64) * 2
    params = SamplingParams(top_p=top_p)
    assert_matches(draw(logits, params, 20000), reference_probs(logits, params))


def test_top_p_with_a_nucleus_larger_than_the_first_candidates() -> None:
    # flat logits: the nucleus holds about half of 3000 tokens, so the sampler must widen its search
    logits = torch.randn(3000) * 0.3
    params = SamplingParams(top_p=0.5)
    expected = reference_probs(logits, params)
    assert int((expected > 0).sum()) > 1000
    samples = draw(logits, params, 4000)
    assert set(samples.tolist()) <= set(expected.nonzero()[:, 0].tolist())
    assert len(set(samples.tolist())) > 1000


@pytest.mark.parametrize("scale, params", [
    (2.0, SamplingParams(top_k=30, top_p=0.8, temperature=0.7)),
    (2.0, SamplingParams(min_p=0.1, temperature=1.3)),
    (2.0, SamplingParams(top_k=50, top_p=0.9, min_p=0.05)),
    # flat logits: the top 12 hold ~6% of the mass, so top-p must renormalise within top-k
    (0.5, SamplingParams(top_k=12, top_p=0.5)),
])
def test_top_k_top_p_min_p_and_temperature_together(scale: float, params: SamplingParams) -> None:
    logits = torch.randn(200) * scale
    assert_matches(draw(logits, params, 20000), reference_probs(logits, params))


def test_min_p_keeps_tokens_near_the_best() -> None:
    logits = torch.randn(100) * 2
    params = SamplingParams(min_p=0.3)
    expected = reference_probs(logits, params)
    probs = torch.softmax(logits.double(), dim=-1)
    assert set(expected.nonzero()[:, 0].tolist()) == set(
        (probs >= 0.3 * probs.max()).nonzero()[:, 0].tolist())
    assert_matches(draw(logits, params, 20000), expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_statistics(temperature: float) -> None:
    logits = torch.randn(30)
    params = SamplingParams(temperature=temperature)
    assert_matches(draw(logits, params, 20000), reference_probs(logits, params))


def test_random_rows_in_one_batch_use_their_own_settings() -> None:
    logits = torch.randn(50) * 2
    settings = [SamplingParams(top_k=3), SamplingParams(min_p=0.5), SamplingParams(top_p=0.6),
                SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)]
    n = 3000
    states = [state(settings[i % len(settings)]) for i in range(n * len(settings))]
    ids = torch.tensor(Sampler()(logits.expand(len(states), -1).contiguous(), states).token_ids)
    for j, params in enumerate(settings):
        if params.greedy:
            assert set(ids[j::len(settings)].tolist()) == {int(logits.argmax())}
        else:
            assert_matches(ids[j::len(settings)], reference_probs(logits, params))


def reference_penalties(logits: torch.Tensor, s: SamplingState) -> torch.Tensor:
    out = logits.clone().double()
    p = s.params
    for t in range(len(out)):
        x = out[t].item()
        if t in s.prompt_token_ids or t in s.output_token_ids:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        count = s.output_token_ids.count(t)
        x -= p.frequency_penalty * count
        x -= p.presence_penalty * (1 if count else 0)
        out[t] = x
    return out


def test_penalties_match_per_row_reference() -> None:
    vocab = 120
    rng = random.Random(0)
    states = []
    for i in range(7):
        params = SamplingParams(
            repetition_penalty=[1.0, 1.3, 0.7][i % 3], presence_penalty=[0.0, 0.5, -0.4][i % 3 - 1],
            frequency_penalty=[0.0, 0.3, 1.1][(i // 2) % 3])
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
        states.append(state(params, prompt, output))
    logits = torch.randn(len(states), vocab) * 3
    penalised = apply_penalties(logits, states)
    for i, s in enumerate(states):
        torch.testing.assert_close(penalised[i].double(), reference_penalties(logits[i], s),
                                   rtol=1e-5, atol=1e-5)
    # greedy decisions follow the penalised logits
    greedy = [state(SamplingParams(temperature=0.0, repetition_penalty=s.params.repetition_penalty,
                                   presence_penalty=s.params.presence_penalty,
                                   frequency_penalty=s.params.frequency_penalty),
                    s.prompt_token_ids, s.output_token_ids) for s in states]
    assert Sampler()(logits, greedy).token_ids == penalised.argmax(dim=-1).tolist()


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    plain = state(SamplingParams(temperature=0.0), prompt=[1])
    penalised = state(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[1])
    assert Sampler()(logits, [plain]).token_ids == [1]
    assert Sampler()(logits, [penalised]).token_ids == [2]  # 5 / 2 < 4


def test_logprobs_are_of_raw_logits() -> None:
    vocab = 16
    logits = torch.randn(4, vocab) * 2
    states = [state(SamplingParams(temperature=0.0, logprobs=3)),
              state(SamplingParams(logprobs=vocab, repetition_penalty=1.8), output=[0, 1, 2]),
              state(SamplingParams(logprobs=0)),
              state(SamplingParams())]
    out = Sampler()(logits, states)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i, n in enumerate([3, vocab, 0]):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(reference[i, lp.token_id].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == torch.argsort(reference[i], descending=True)[:n].tolist()
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(reference[i, t].item(), abs=1e-5)
    full = out.logprobs[1]
    assert sum(torch.tensor([v for _, v in full.top]).double().exp()).item() == pytest.approx(1.0)
    assert out.logprobs[3] is None


def test_make_generator() -> None:
    assert make_generator(SamplingParams(), CPU) is None
    a = make_generator(SamplingParams(seed=-5), CPU)
    b = make_generator(SamplingParams(seed=-5), CPU)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_bf16_random_rows() -> None:
    logits = (torch.randn(20) * 2).bfloat16()
    params = SamplingParams(top_p=0.9)
    assert_matches(draw(logits, params, 10000), reference_probs(logits.float(), params))
