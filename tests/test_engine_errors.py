"""Bad input gets a clear error that names the field (or the file) and the problem."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.loader import ModelLoadError, resolve_model_dir
from engine.sampling_params import InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(num_blocks=64)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=("",)), "stop"),
    (dict(logprobs=99), "logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and str(err.value).startswith(field)


def test_empty_prompt(engine):
    with pytest.raises(InvalidRequestError, match="prompt: is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="prompt: is empty"):
        engine.add_request("", SamplingParams())


def test_prompt_over_context(engine):
    too_long = [1] * engine.max_model_len
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request(too_long, SamplingParams())


def test_prompt_larger_than_the_kv_cache(engine):
    capacity = engine.kv.num_blocks * engine.kv.block_size
    with pytest.raises(InvalidRequestError, match="KV cache"):
        engine.add_request([1] * capacity, SamplingParams())


def test_token_id_outside_vocab(engine):
    with pytest.raises(InvalidRequestError, match="prompt_token_ids: token id 49152"):
        engine.add_request([1, 2, 49152], SamplingParams())


def test_duplicate_request_id(engine):
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=1), request_id="dup")
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request([1, 2, 3], SamplingParams(), request_id="dup")
    engine.abort("dup")
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished


def test_nothing_is_left_behind_after_errors(engine):
    assert not engine.has_unfinished and engine.kv.pool.num_used == 0


def test_unknown_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        resolve_model_dir(str(missing))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    res = _cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "nope") in res.stderr
    res = _cli("generate", "--max-tokens", "0", "hi")
    assert res.returncode == 2 and "max_tokens" in res.stderr


def test_cli_generate_json(engine):
    res = _cli("generate", "--json", "--temperature", "0", "--max-tokens", "5", "--ignore-eos",
               "The capital of France is")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    [want] = engine.generate(["The capital of France is"],
                             SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert out["token_ids"] == want.token_ids and out["text"] == want.text
