"""The tokenizer built from the default GGUF's metadata, against transformers' own GGUF tokenizer,
and the chat template renderer.

Only the tokenizer files are written here (no weight conversion): ~4 s, plus ~10 s for transformers.
"""
from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import pytest

from engine.gguf_convert import build_tokenizer, open_gguf, write_tokenizer_files
from engine.loader import ModelLoadError, default_gguf_path, load_tokenizer
from engine.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done what you'd want, isn't it?",
    "héllo wörld ñandú façade naïve",
    "Ελληνικά русский язык العربية עברית हिन्दी",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "e\u0301 combining, zero\u200bwidth, nbsp\u00a0here",
    "a  b   c\t\td\n\ne\r\nf      ",
    "   leading and trailing   ",
    "\n\n\n",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x != y: pass",
    '{"key": [1, 2.5, -3e10], "nested": {"ok": true}}',
    "https://example.com/path?q=a&b=c#frag",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "<|im_start|notatoken|> <| im_end |>",
    "3.14159 2024-11-23 1,000,000 007 ٣٤٥ ½ Ⅻ",
    "  1  22   333\t4\n5x6",
    "version v1.2.3-rc4 at 10:30pm",
    "\x00\x07 control \x1b[31mred\x1b[0m",
    "",
]


@pytest.fixture(scope="module")
def gguf_metadata():
    path = default_gguf_path()
    _, metadata = open_gguf(path)
    return path, metadata


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, gguf_metadata) -> Path:
    path, metadata = gguf_metadata
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(metadata, path, out, max_len=8192)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    gguf = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def split_digits(text: str) -> list[str]:
    """Cut before and after every \\p{N} character (what tokenizer.ggml.pre = "smollm" asks for)."""
    pieces, current = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [current, ch]
            current = ""
        else:
            current += ch
    return [p for p in pieces + [current] if p]


def has_digit(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("N") for ch in text)


@pytest.mark.parametrize("text", [t for t in TEXTS if not has_digit(t)])
def test_encode_equals_transformers_gguf_tokenizer(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", [t for t in TEXTS if has_digit(t)])
def test_digits_are_split_one_by_one(tok, hf_tok, text):
    # llama.cpp and the original SmolLM2 tokenizer.json split every digit out before BPE;
    # transformers' GGUF tokenizer ignores tokenizer.ggml.pre, so compare piece by piece.
    want = [i for piece in split_digits(text) for i in hf_tok.encode(piece, add_special_tokens=False)]
    assert tok.encode(text) == want


def test_whitespace_before_a_digit_stays_one_token(tok):
    # where the digit rule changes the ids: "  1" is "ĠĠ","1" (transformers' GGUF tokenizer: "Ġ","Ġ","1")
    assert tok.encode("  1") == [tok.backend.token_to_id("ĠĠ"), tok.backend.token_to_id("1")]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok)
    assert tok.bos_token_id == hf_tok.bos_token_id and tok.eos_token_ids == (hf_tok.eos_token_id,)
    assert tok.backend.id_to_token(tok.eos_token_ids[0]) == "<|im_end|>"
    markers = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert markers[0] == tok.bos_token_id and markers[-1] == tok.eos_token_ids[0]  # whole, not split
    assert tok.decode(markers) == "user\nhi"  # skip_special_tokens by default
    hf_special = {i for i, t in hf_tok.added_tokens_decoder.items() if t.special}
    assert hf_special and all(tok.is_special(i) for i in hf_special)
    assert not any(tok.is_special(i) for i in tok.encode("plain words, no markers"))


def test_add_special_tokens_follows_the_file(tok, gguf_metadata):
    _, metadata = gguf_metadata
    ids = tok.encode("hi", add_special_tokens=True)
    with_bos = metadata.get("tokenizer.ggml.add_bos_token", False)
    assert ids == ([tok.bos_token_id] if with_bos else []) + tok.encode("hi")


def test_add_bos_when_the_file_asks(gguf_metadata):
    path, metadata = gguf_metadata
    backend, config = build_tokenizer(metadata | {"tokenizer.ggml.add_bos_token": True}, path)
    tok = Tokenizer(backend, bos_token_id=metadata["tokenizer.ggml.bos_token_id"])
    assert config["add_bos_token"]
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id] + tok.encode("hi")


@pytest.mark.parametrize("key, value", [("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "made-up")])
def test_unsupported_tokenizer_names_file(gguf_metadata, key, value):
    path, metadata = gguf_metadata
    with pytest.raises(ModelLoadError, match=re.escape(str(path))) as err:
        build_tokenizer(metadata | {key: value}, path)
    assert value in str(err.value)


# ---------------------------------------------------------------- chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue? 🌤"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and <b>3+3</b>?\n  indented"}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_equals_transformers(tok, hf_tok, messages, generation_prompt):
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == want


def test_chat_template_is_chatml(tok):
    text = tok.apply_chat_template(CONVERSATIONS[2])
    turns = re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", text, flags=re.S)
    assert [role for role, _ in turns] == ["system", "user", "assistant", "user"]
    assert [c for _, c in turns[1:]] == [m["content"] for m in CONVERSATIONS[2]]
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_sources(tok_dir, tmp_path):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0])
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]
    config = {"chat_template": named, "bos_token": "<|im_start|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0]) == "<|im_start|>D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[1]) == "J2"


@pytest.mark.parametrize("template, problem", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError|undefined|unsafe"),
    ("{% for %}", "does not compile"),
])
def test_chat_template_errors(tok, template, problem):
    broken = Tokenizer(tok.backend, chat_template=template)
    with pytest.raises(ChatTemplateError, match=problem):
        broken.apply_chat_template(CONVERSATIONS[0])


def test_chat_template_tojson_keeps_text(tok):
    t = Tokenizer(tok.backend, chat_template="{{ messages[0] | tojson }}")
    message = {"role": "user", "content": "<é>"}
    assert t.apply_chat_template([message]) == json.dumps(message, ensure_ascii=False)
