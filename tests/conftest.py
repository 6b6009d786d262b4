"""Shared fixtures: the default model converted once per session, and a small engine factory."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


@pytest.fixture(scope="session")
def model_dir():
    from engine.loader import resolve_model_dir
    return resolve_model_dir("default")


@pytest.fixture(scope="session")
def make_engine(model_dir):
    """Builds an engine on the default model with the given cache/scheduler settings."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import Engine

    def build(block_size=16, num_blocks=256, prefix_caching=True, max_num_seqs=64,
              max_num_batched_tokens=2048, chunked=True, **kwargs) -> Engine:
        return Engine(EngineConfig(
            model=str(model_dir), dtype="float32", device="cpu",
            cache=CacheConfig(block_size, num_blocks, prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, chunked), **kwargs))
    return build
