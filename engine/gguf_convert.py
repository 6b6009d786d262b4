"""Convert a llama.cpp GGUF file into a HF-style model directory, so the rest of pdserve reads one format.

The directory holds config.json, generation_config.json, model.safetensors (fp32, dequantized),
tokenizer.json (built from the GGUF metadata) and tokenizer_config.json (special tokens, chat template).
`engine.loader.resolve_model_dir` calls `convert_gguf` once per file and caches the result.

Supported: architecture "llama" (Llama, Mistral, SmolLM, ...) with a byte-level BPE tokenizer
(tokenizer.ggml.model "gpt2"). Anything else is refused with a ModelLoadError naming the file.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from engine.loader import ModelLoadError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# How each tokenizer.ggml.pre splits text before BPE, as llama.cpp (llama-vocab.cpp) and the original
# tokenizer.json files do it. "smollm" splits every digit on its own, which transformers' GGUF tokenizer
# (5.x) ignores: it then differs on text like "  1" (llama.cpp and the original SmolLM2 give "ĠĠ","1").
_GPT2_PRE = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    """(GGUFReader, metadata as plain Python values); any parse failure names the file."""
    import gguf  # imported here: only conversion needs it

    try:
        reader = gguf.GGUFReader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
        raise ModelLoadError(f"{path}: not a readable GGUF file, truncated or corrupt "
                             f"({type(e).__name__}: {e})") from e
    return reader, metadata


def _get(metadata: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise ModelLoadError(f"{path}: GGUF metadata has no {key!r}")
    return default


def _f32(value: float) -> float:
    # GGUF stores float32; print it the short way (1e-05, not 9.999999747378752e-06)
    return float(str(np.float32(value)))


def hf_config(metadata: dict[str, Any], tensor_names: set[str], embed_rows: int, path: Path) -> dict:
    """config.json contents for the model a GGUF file describes."""
    arch = _get(metadata, "general.architecture", path)
    if arch != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(f"{path}: rope_freqs (Llama 3.1 rope scaling in GGUF) is not supported; "
                             "use the HF directory of this model")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelLoadError(f"{path}: GGUF rope scaling {scaling!r} is not supported")

    def key(name: str, default: Any = ...) -> Any:
        return _get(metadata, f"{arch}.{name}", path, default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings are not supported")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": embed_rows,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each head; HF keeps them as two blocks.
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)  # blk, N, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise ModelLoadError(f"{path}: unexpected tensor {gguf_name!r} for a llama model")


def hf_tensors(reader: Any, config: dict, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, fp32 array shaped (out, in)) for every tensor of the file, dequantized."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = _hf_name(t.name, path)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {t.name!r} ({type(e).__name__}: {e})") from e
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        yield name, np.ascontiguousarray(w)


def _pre_tokenizer(pre: str, path: Path) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a tokenizer.ggml.pre value."""
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return gpt2_split, False
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split]), False
    if pre in _LLAMA3_PRE:
        # Llama 3 looks whole words up in the vocabulary before merging (ignore_merges)
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, to_bytes]), True
    raise ModelLoadError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(_GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE)})")


def build_tokenizer(metadata: dict[str, Any], path: Path) -> tuple[Tokenizer, dict]:
    """A `tokenizers` byte-level BPE tokenizer and its tokenizer_config.json, from GGUF metadata."""
    kind = _get(metadata, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer.ggml.model {kind!r} is not supported "
                             "(only byte-level BPE, 'gpt2')")
    tokens: list[str] = _get(metadata, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ")) for m in _get(metadata, "tokenizer.ggml.merges", path)]
    if any(len(m) != 2 for m in merges):
        raise ModelLoadError(f"{path}: tokenizer.ggml.merges holds an entry that is not two tokens")
    pre, ignore_merges = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), path)
    backend = Tokenizer(models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                                   ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()

    ids = {name: metadata.get(f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    special = {i for i, ty in enumerate(types) if ty == _CONTROL} | {i for i in ids.values() if i is not None}
    # Added tokens are matched whole in the text before BPE, as llama.cpp does with control tokens.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in sorted(special)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, ty in enumerate(types) if ty == _USER_DEFINED])

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    if add_bos or add_eos:  # encode(add_special_tokens=True) then adds them, as llama.cpp does
        bos = [(tokens[ids["bos"]], ids["bos"])] if add_bos else []
        eos = [(tokens[ids["eos"]], ids["eos"])] if add_eos else []
        single = " ".join([t for t, _ in bos] + ["$A"] + [t for t, _ in eos])
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} {single.replace('$A', '$B:1')}", special_tokens=bos + eos)

    def name_of(i: int | None) -> str | None:
        return tokens[i] if i is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name_of(ids["bos"]),
        "eos_token": name_of(ids["eos"]),
        "unk_token": name_of(ids["unknown"]),
        "pad_token": name_of(ids["padding"]),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "chat_template": metadata.get("tokenizer.chat_template"),
    }
    return backend, tokenizer_config


def generation_config(metadata: dict[str, Any]) -> dict:
    # end-of-turn / end-of-message ids stop generation too (Llama 3 style files carry them)
    eos = [metadata.get(f"tokenizer.ggml.{n}_token_id") for n in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    return {"bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id")}


def write_tokenizer_files(metadata: dict[str, Any], path: Path, out_dir: Path, max_len: int) -> None:
    backend, tokenizer_config = build_tokenizer(metadata, path)
    backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config | {"model_max_length": max_len}, indent=2, ensure_ascii=False))
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(metadata), indent=2))


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write the HF-style directory for GGUF file `path` into the existing, empty `out_dir`."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    reader, metadata = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ModelLoadError(f"{path}: GGUF file has no token_embd.weight tensor")
    embed_rows = int(by_name["token_embd.weight"].shape[-1])
    config = hf_config(metadata, set(by_name), embed_rows, path)
    # the tokenizer first: an unsupported one fails before seconds of dequantizing
    write_tokenizer_files(metadata, path, out_dir, config["max_position_embeddings"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    tensors = dict(tqdm(hf_tensors(reader, config, path), total=len(reader.tensors), desc="dequantizing",
                        unit="tensor", file=sys.stderr))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
