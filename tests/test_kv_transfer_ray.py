"""Real engines in two Ray actors, KV over real UCX: the greedy tokens equal one engine's,
also when the two sides use different block sizes."""
from __future__ import annotations

import asyncio

import pytest

from decode_worker.actor import RemoteDecodeWorker
from engine.config import CacheConfig, EngineConfig
from engine.sampling_params import SamplingParams
from prefill_worker.actor import RemotePrefillWorker

PROMPTS = ["The quick brown fox", "In a distant galaxy, " * 12 + "the"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def actors(ray_local, model_dir):
    cfg = lambda bs: EngineConfig(model=str(model_dir), cache=CacheConfig(bs, 128))  # noqa: E731
    opts = dict(num_cpus=0.5, max_restarts=0)
    decode = RemoteDecodeWorker.options(**opts).remote("d0", cfg(8), "ucx", 30.0, 1, "127.0.0.1")
    prefill = RemotePrefillWorker.options(**opts).remote("p0", cfg(16), "ucx", 30.0, 1, "127.0.0.1")
    ray_local.get([decode.ready.remote(), prefill.ready.remote()], timeout=120)
    yield prefill, decode
    for a in (prefill, decode):
        ray_local.kill(a)


async def disaggregated(prefill, decode, rid, ids, params):
    lease = await decode.reserve.remote(rid, len(ids))
    first_ref = prefill.prefill.remote(rid, ids, params, lease)
    tokens = []
    async for ref in decode.generate.remote(rid, ids, params):
        out = await ref
        tokens += out.new_token_ids
    assert await first_ref == tokens[0]
    return tokens


def test_greedy_over_ucx_between_actors_equals_one_engine(actors, make_engine):
    prefill, decode = actors
    colocated = make_engine()
    ids = [colocated.tokenizer.encode(p) for p in PROMPTS]
    want = [c.token_ids for c in colocated.generate(ids, GREEDY)]

    async def run_all():
        return await asyncio.gather(*(disaggregated(prefill, decode, f"r{i}", x, GREEDY)
                                      for i, x in enumerate(ids)))

    got = asyncio.run(run_all())
    assert got == want
    import ray
    stats = ray.get(decode.stats.remote(), timeout=30)
    assert stats["kv_blocks_used"] == 0  # every block back in the pool
    assert stats["transfers_ready"] == len(PROMPTS) and stats["bytes_received"] > 0
    assert stats["running"] == 0 and stats["pending_transfers"] == 0
