"""Model loading: GGUF conversion (against transformers' own GGUF loader), the cache, config and
weight reading, and every error naming its file.

The default GGUF is converted once for this module into a private cache (~9 s); transformers'
GGUF load for the reference takes ~20 s more.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import gguf_convert
from engine.loader import (ModelLoadError, cache_target, default_gguf_path, load_model_config,
                           load_tokenizer, load_weights, resolve_model_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def converted(cache) -> tuple[Path, float]:
    """(converted dir, seconds the conversion took). A stale temp dir, as a crash would leave, is
    planted first: the conversion must clear it."""
    stale = cache / f".{cache_target(default_gguf_path(), cache).name}.tmp-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    start = time.perf_counter()
    model_dir = resolve_model_dir("default", cache_dir=cache)
    return model_dir, time.perf_counter() - start


@pytest.fixture(scope="module")
def hf_gguf_model():
    """transformers' own reading of the GGUF file: the reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it for GGUF files
    gguf = default_gguf_path()
    model = transformers.LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- conversion and cache

def test_conversion_writes_a_complete_fp32_hf_dir(converted, cache):
    model_dir, _ = converted
    assert model_dir.parent == cache
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    # nothing half-written left beside it, the planted stale temp dir included
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_second_resolve_is_a_cache_hit(converted, cache):
    model_dir, first_seconds = converted
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model_dir("default", cache_dir=cache)
    by_path = resolve_model_dir(str(default_gguf_path()), cache_dir=cache)
    cached_seconds = time.perf_counter() - start
    assert again == by_path == model_dir
    assert cached_seconds < 0.1 < first_seconds
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten


def test_hf_dir_resolves_to_itself(converted):
    model_dir, _ = converted
    assert resolve_model_dir(str(model_dir)) == model_dir.resolve()


def test_converted_logits_equal_transformers_gguf(converted, hf_gguf_model):
    transformers = pytest.importorskip("transformers")
    model_dir, _ = converted
    ours = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    with torch.inference_mode():
        want = hf_gguf_model(torch.tensor([ids])).logits
        got = ours(torch.tensor([ids])).logits
    assert (got - want).abs().max().item() <= 1e-4
    # a wrong q/k layout would make the model answer end-of-turn at once
    assert got[0, -1].argmax().item() not in tok.eos_token_ids


def test_load_weights_equal_transformers_gguf_weights(converted, hf_gguf_model):
    model_dir, _ = converted
    config = load_model_config(model_dir)
    weights = load_weights(model_dir, config, torch.float32)
    reference = hf_gguf_model.state_dict()
    # the tied lm_head is not a separate tensor for us
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name, tensor in weights.items():
        if not torch.equal(tensor, reference[name]):  # both dequantize with gguf-py: usually identical
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_model_config_matches_transformers_gguf_config(converted, hf_gguf_model):
    model_dir, _ = converted
    ours, ref = load_model_config(model_dir), hf_gguf_model.config
    assert ours.architecture == "LlamaForCausalLM"
    pairs = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "max_position_embeddings": "max_position_embeddings"}
    assert {k: getattr(ours, k) for k in pairs} == {k: getattr(ref, v) for k, v in pairs.items()}
    assert ours.rope_theta == pytest.approx(ref.rope_parameters["rope_theta"], rel=1e-6)
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours.tie_word_embeddings and ours.rope_scaling is None and not ours.attention_bias
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_ids == (ref.eos_token_id,)


def test_load_weights_in_another_dtype(converted):
    model_dir, _ = converted
    config = load_model_config(model_dir)
    fp32 = load_weights(model_dir, config, torch.float32)
    bf16 = load_weights(model_dir, config, torch.bfloat16)
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16))


def test_crash_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # also a Ctrl-C: not only Exceptions
    monkeypatch.setattr(gguf_convert, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir("default", cache_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_resolves_convert_once(tmp_path, monkeypatch):
    calls = []

    def slow_convert(gguf_path, out_dir):
        calls.append(gguf_path)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_convert, "convert_gguf", slow_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_dir("default", tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1


# ---------------------------------------------------------------- config.json parsing

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=8, intermediate_size=16,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


def write_config(model_dir: Path, **overrides) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in (TINY | overrides).items() if v is not None}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


def test_config_llama_defaults(tmp_path):
    config = load_model_config(write_config(tmp_path))
    assert (config.architecture, config.num_kv_heads, config.head_dim) == ("LlamaForCausalLM", 1, 4)
    assert not config.attention_bias and config.rope_scaling is None and config.eos_token_ids == (2,)


def test_config_qwen2_has_attention_bias(tmp_path):
    config = load_model_config(write_config(tmp_path, architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    assert config.attention_bias


def test_config_explicit_head_dim_and_eos_list(tmp_path):
    write_config(tmp_path, architectures=["MistralForCausalLM"], head_dim=16, eos_token_id=[2, 7])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    config = load_model_config(tmp_path)
    assert config.head_dim == 16 and config.eos_token_ids == (2, 7, 9)


def test_config_llama3_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    assert load_model_config(write_config(tmp_path, rope_scaling=rope)).rope_scaling == (8.0, 1.0, 4.0, 8192)


def test_config_transformers5_rope_parameters(tmp_path):
    write_config(tmp_path, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    config = load_model_config(tmp_path)
    assert config.rope_theta == 5e5 and config.rope_scaling is None


@pytest.mark.parametrize("overrides, problem", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_kv_heads"),  # from ModelConfig's own check
    (dict(hidden_act="gelu"), "SiLU"),
])
def test_config_errors_name_config_json(tmp_path, overrides, problem):
    write_config(tmp_path, **overrides)
    with pytest.raises(ModelLoadError) as err:
        load_model_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and problem in str(err.value)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_config(tmp_path)


# ---------------------------------------------------------------- weights and directories

def tiny_tensors(cfg: dict) -> dict[str, torch.Tensor]:
    """The HF names and shapes of TINY, spelled out here rather than taken from the loader."""
    g = torch.Generator().manual_seed(0)
    h, v, f, kv = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], 4  # 1 KV head of 8 / 2
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
             "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    shapes |= {f"model.layers.0.{name}": shape for name, shape in layer.items()}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def tiny_model(model_dir: Path, drop: str | None = None,
               reshape: str | None = None) -> dict[str, torch.Tensor]:
    write_config(model_dir)
    tensors = tiny_tensors(TINY)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    save_file({k: v for k, v in tensors.items() if k != drop}, model_dir / "model.safetensors")
    return tensors


def test_tiny_weights_load(tmp_path):
    tensors = tiny_model(tmp_path)
    weights = load_weights(tmp_path, load_model_config(tmp_path), torch.float32)
    assert weights.keys() == tensors.keys()
    assert all(torch.equal(weights[k], tensors[k]) for k in tensors)


def test_sharded_weights_load(tmp_path):
    write_config(tmp_path)
    tensors = tiny_tensors(TINY)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, tmp_path / file)
    index = {"weight_map": {k: file for file, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = load_weights(tmp_path, load_model_config(tmp_path), torch.float32)
    assert all(torch.equal(weights[k], tensors[k]) for k in tensors) and weights.keys() == tensors.keys()
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_weights(tmp_path, load_model_config(tmp_path), torch.float32)


def test_missing_tensor_names_tensor_and_file(tmp_path):
    tiny_model(tmp_path, drop="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError) as err:
        load_weights(tmp_path, load_model_config(tmp_path), torch.float32)
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value)
    assert str(tmp_path / "model.safetensors") in str(err.value)


def test_wrong_shape_names_tensor_and_file(tmp_path):
    tiny_model(tmp_path, reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ModelLoadError) as err:
        load_weights(tmp_path, load_model_config(tmp_path), torch.float32)
    assert "model.layers.0.self_attn.k_proj.weight" in str(err.value) and "shape" in str(err.value)
    assert str(tmp_path / "model.safetensors") in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_file(tmp_path, damage):
    tiny_model(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelLoadError, match=str(path)):
        load_weights(tmp_path, load_model_config(tmp_path), torch.float32)


@pytest.mark.parametrize("remove", ["config.json", "tokenizer.json", "model.safetensors"])
def test_incomplete_hf_dir_names_what_is_missing(tmp_path, remove):
    tiny_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / remove).unlink()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(str(tmp_path))
    assert str(tmp_path) in str(err.value) and (remove in str(err.value) or "safetensors" in str(err.value))


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "nope")):
        resolve_model_dir(str(tmp_path / "nope"))


def test_not_a_model_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="weights.bin"):
        resolve_model_dir(str(tmp_path / "weights.bin"))


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf_names_file_and_leaves_no_dir(tmp_path, damage):
    source = default_gguf_path()
    bad = tmp_path / "bad.gguf"
    with open(source, "rb") as f:
        bad.write_bytes(f.read(20 << 20) if damage == "truncate" else b"GGUF" + b"\xff" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=str(bad)):
        resolve_model_dir(str(bad), cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
