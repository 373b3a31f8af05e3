"""Text <-> token ids for serving: a thin wrapper over HF `tokenizers`.

`Tokenizer` follows the vLLM/transformers idiom (`encode`, `decode`, `eos_token_id`,
`apply_chat_template`) and is built from a GGUF file's metadata, GPT-2 `vocab.json`/`merges.txt`,
or a `tokenizer.json` directory. `IncrementalDetokenizer` turns a stream of sampled ids into text
deltas that never split a multi-byte UTF-8 character, so the engine can stream output and match
stop strings on text.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# GGUF `tokenizer.ggml.pre` -> pre-tokenizer. llama.cpp gives the `smollm` family the StarCoder
# split: isolate every `\p{N}` first, then the GPT-2 regex; HF's SmolLM2 tokenizer.json spells
# that Digits(individual_digits=True) + ByteLevel. (transformers' GGUF converter drops the Digits
# step, which changes ids for e.g. "  1": ["ĠĠ", "1"] here, ["Ġ", "Ġ", "1"] there.)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_ONLY = ("gpt2", "default", "mpt", "olmo", "jais")

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens decoded as left context.
_INITIAL_PREFIX_TOKENS = 5


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_ONLY:
        return byte_level
    raise ValueError(f"unsupported GGUF tokenizer.ggml.pre={pre!r}")


def _byte_level_bpe(model: models.BPE, pre_tokenizer: pre_tokenizers.PreTokenizer):
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE's alphabet read backwards: the printable Latin-1 bytes stand for
    themselves, every other byte b for chr(256 + its rank among those others)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    # Like transformers: jinja's built-in tojson HTML-escapes, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled in jinja2's immutable sandbox with transformers' extras
    (the tokenizer's own, and those requests bring, which repeat)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """The rendered chat up to the end of its last message's content (what follows it, an
    end-of-turn marker, is dropped); templates that trim content are matched trimmed."""
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or not final.strip():
        raise ValueError("continue_final_message needs a last message with text content")
    for content in (final, final.strip()):
        at = text.rfind(content)
        if at >= 0:
            return text[: at + len(content)]
    raise ValueError(
        "continue_final_message: the last message's content does not appear in the rendered "
        "chat (the template changes it)"
    )


class Tokenizer:
    """A byte-level BPE tokenizer with the special ids and chat template a server needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ):
        self.backend_tokenizer = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token=True needs a bos_token_id")
        self.add_bos_token = add_bos_token
        self._texts: list[str] | None = None  # token_text's table, built at its first call
        self._bytes: list[bytes | None] | None = None  # token_bytes(), built at its first call

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (the model's embedding rows)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend_tokenizer.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it (`<|im_start|>`) map to one id each.

        `add_special_tokens` adds BOS only where the tokenizer asks for it (`add_bos_token`).
        """
        ids = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos_token else ids

    def token_bytes(self) -> list[bytes | None]:
        """Per token id, the bytes it stands for in decoded text; None for special tokens.

        What a token automaton (structured outputs) walks. Byte-level vocabularies map each
        character back to its byte; SentencePiece-style ones (Llama's tokenizer.json) read
        `\u2581` as a space and `<0xNN>` byte tokens as their byte. (Decoding a token alone
        would not do: their decoders strip a leading space.) Built once, then the same list."""
        if self._bytes is not None:
            return self._bytes
        backend = self.backend_tokenizer
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        table = _unicode_to_byte()
        out: list[bytes | None] = [None] * self.vocab_size
        for token, i in backend.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if byte_level and all(c in table for c in token):
                out[i] = bytes(table[c] for c in token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = bytes([int(token[3:5], 16)])
            else:
                out[i] = token.replace("\u2581", " ").encode()
        self._bytes = out
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid or incomplete UTF-8 becomes U+FFFD."""
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included (what logprobs show)."""
        texts = self.token_texts()
        return texts[token_id] if token_id < len(texts) else ""  # past the vocabulary

    def token_texts(self) -> list[str]:
        """`token_text` of every id: the first call decodes the whole vocabulary in one
        batch (tens of ms), later ones return the same list."""
        if self._texts is None:
            ids = [[i] for i in range(self.vocab_size)]
            self._texts = self.backend_tokenizer.decode_batch(ids, skip_special_tokens=False)
        return self._texts

    def token_utf8(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a character is its own bytes, where
        `token_text` shows U+FFFD); a special token's text."""
        table = self.token_bytes()
        raw = table[token_id] if token_id < len(table) else None
        return self.token_text(token_id).encode() if raw is None else raw

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the tokenizer's Jinja chat template, as transformers does.

        The template runs in jinja2's immutable sandbox with transformers' extras
        (`raise_exception`, `strftime_now`, a non-escaping `tojson`, loop controls); extra
        `kwargs` (e.g. `tools`, or a template's own switches) are passed to it. Encode the
        result with `add_special_tokens=False`.

        `continue_final_message`: leave the last message open (the text ends with its
        content, no end-of-turn after it), so the model continues it, e.g. a reply the
        caller has started; it excludes `add_generation_prompt`. `chat_template`: a template
        to use instead of the tokenizer's (the same sandbox).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message continues the last message; it cannot be combined "
                "with add_generation_prompt, which opens a new one"
            )
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template; pass chat_template= when building it or "
                "format the prompt yourself"
            )
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self._token(self.pad_token_id),
            **kwargs,
        }
        text = _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )
        return _cut_after_final_message(text, messages) if continue_final_message else text

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` metadata (byte-level BPE, `ggml.model=gpt2`)."""
        from models.loaders.gguf_llama import GGUFFile  # noqa: PLC0415 (numpy + struct only)

        metadata = GGUFFile(os.fspath(path), strings=True).metadata

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(key)
            if value is None:
                return default
            return value.tolist() if isinstance(value, np.ndarray) else value

        if (kind := get("tokenizer.ggml.model")) != "gpt2":
            raise ValueError(f"only byte-level BPE GGUF tokenizers are supported, got {kind!r}")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges)
        backend = _byte_level_bpe(bpe, _byte_level_pre_tokenizer(get("tokenizer.ggml.pre", "gpt2")))
        types = get("tokenizer.ggml.token_type", [])

        def of_type(kind: int) -> list[str]:
            return [tokens[i] for i, t in enumerate(types) if t == kind]

        # Control tokens (<|im_start|>, ...) must encode to their one id wherever they appear.
        specials = [AddedToken(t, special=True, normalized=False) for t in of_type(_CONTROL)]
        backend.add_special_tokens(specials)
        backend.add_tokens([AddedToken(t, normalized=False) for t in of_type(_USER_DEFINED)])
        return cls(
            backend,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_id=get("tokenizer.ggml.eos_token_id"),
            pad_token_id=get("tokenizer.ggml.padding_token_id"),
            chat_template=get("tokenizer.chat_template"),
            add_bos_token=get("tokenizer.ggml.add_bos_token", False),
        )

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike | None = None,
        *,
        special_token: str = "<|endoftext|>",
        chat_template: str | None = None,
    ) -> Tokenizer:
        """GPT-2 style BPE from `vocab.json` + `merges.txt` (or a directory holding both).

        `special_token` (GPT-2's `<|endoftext|>`) is BOS and EOS when it is in the vocabulary.
        """
        if os.path.isdir(vocab_json):
            vocab_json, merges_txt = (
                os.path.join(vocab_json, f) for f in ("vocab.json", "merges.txt")
            )
        if merges_txt is None:
            raise ValueError("merges_txt is required when vocab_json is a file")
        bpe = models.BPE.from_file(os.fspath(vocab_json), os.fspath(merges_txt))
        backend = _byte_level_bpe(bpe, _byte_level_pre_tokenizer("gpt2"))
        special_id = backend.token_to_id(special_token)
        if special_id is not None:
            backend.add_special_tokens([AddedToken(special_token, special=True, normalized=False)])
        return cls(
            backend, bos_token_id=special_id, eos_token_id=special_id, chat_template=chat_template
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a local HF tokenizer directory: `tokenizer.json` (+ `tokenizer_config.json`,
        `chat_template.jinja`), or else GPT-2 `vocab.json` + `merges.txt`."""
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tokenizer_json):
            if os.path.exists(os.path.join(path, "vocab.json")):
                return cls.from_gpt2_files(path)
            raise FileNotFoundError(f"no tokenizer.json or vocab.json in {os.fspath(path)!r}")
        backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        config: dict[str, Any] = {}
        if os.path.exists(config_path := os.path.join(path, "tokenizer_config.json")):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if os.path.exists(jinja_path := os.path.join(path, "chat_template.jinja")):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        def token_id(key: str) -> int | None:
            token = config.get(key)  # a string or an AddedToken dict
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else backend.token_to_id(token)

        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            pad_token_id=token_id("pad_token"),
            chat_template=template,
            # tokenizer.json's own post-processor already adds BOS where the model wants it.
            add_bos_token=False,
        )


def _decode_window(
    tokenizer: Tokenizer, token_ids: Sequence[int], prefix_offset: int, read_offset: int, skip: bool
) -> tuple[str, str]:
    """Text of the already-emitted context window, and of that window plus the new ids."""
    prefix_text = tokenizer.decode(token_ids[prefix_offset:read_offset], skip)
    return prefix_text, tokenizer.decode(token_ids[prefix_offset:], skip)


def detokenize_incrementally(
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    prefix_offset: int,
    read_offset: int,
    *,
    skip_special_tokens: bool = True,
) -> tuple[str, int, int]:
    """The text added by the ids after `read_offset`, as `(delta, prefix_offset, read_offset)`.

    `token_ids[prefix_offset:read_offset]` has been emitted already and is decoded again as left
    context (decoders that strip or merge spaces depend on it). While the new tail decodes to an
    unfinished UTF-8 character (a trailing U+FFFD), nothing is emitted and the offsets stay put.
    """
    prefix_text, new_text = _decode_window(
        tokenizer, token_ids, prefix_offset, read_offset, skip_special_tokens
    )
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        return new_text[len(prefix_text) :], read_offset, len(token_ids)
    return "", prefix_offset, read_offset


class IncrementalDetokenizer:
    """Streams the text of one request's output, one sampled token at a time.

    `push(token_id)` returns the newly completed text (possibly ""); `flush()` returns what is
    still held back when the stream ends. The concatenation of all returns equals
    `tokenizer.decode(output_ids)`, and no return ends inside a multi-byte character.

    The work is `detokenize_incrementally`'s, done per token by the `tokenizers` library's own
    `DecodeStream` (the same window rule, without two Python-level decodes per token: the
    engine runs this for every running request every iteration). The Python rule takes over
    where the stream cannot start from the same state (a prompt tail that is not complete text)
    or refuses a step (a decoder that rewrites the text before the window), so both give the
    same deltas.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids)  # prompt + output so far
        self.prefix_offset = max(len(self.token_ids) - _INITIAL_PREFIX_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.output_text = ""  # everything returned so far
        self._stream = self._primed_stream()

    def _primed_stream(self) -> decoders.DecodeStream | None:
        """A stream that has emitted the prompt's left context and holds nothing back, or
        None when it cannot start there (the context ends inside a character, say)."""
        stream = decoders.DecodeStream(skip_special_tokens=self.skip_special_tokens)
        backend = self.tokenizer.backend_tokenizer
        emitted = None
        for token_id in self.token_ids[self.prefix_offset :]:
            emitted = stream.step(backend, token_id)
        return stream if emitted is not None or self.read_offset == 0 else None

    def push(self, token_id: int) -> str:
        """Append one output token; return the text it completes."""
        self.token_ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self.tokenizer.backend_tokenizer, token_id)
            except Exception:  # noqa: BLE001 (tokenizers' InvalidPrefix): the rule below
                self._stream = None
            else:
                if delta is not None:
                    self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
                    self.output_text += delta
                return delta or ""
        delta, self.prefix_offset, self.read_offset = detokenize_incrementally(
            self.tokenizer,
            self.token_ids,
            self.prefix_offset,
            self.read_offset,
            skip_special_tokens=self.skip_special_tokens,
        )
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """End of stream: return the held-back tail, U+FFFD for any unfinished character."""
        prefix_text, new_text = _decode_window(
            self.tokenizer,
            self.token_ids,
            self.prefix_offset,
            self.read_offset,
            self.skip_special_tokens,
        )
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self._stream = None  # ended: any further push takes the rule's path
        self.output_text += new_text[len(prefix_text) :]
        return new_text[len(prefix_text) :]
