"""`LLM`: offline batched generation in vLLM's idiom, on the iteration-level engine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from models import ModelConfig
from models.config import parse_attention_options
from models.layers import Params
from models.quantize import quantize_params
from orca_jax.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from orca_jax.engine.config import EngineConfig
from orca_jax.engine.engine import Engine, unpack_prompt
from orca_jax.engine.lora import LoRARequest
from orca_jax.engine.outputs import RequestOutput
from orca_jax.engine.speculative import SpeculativeConfig
from orca_jax.model_loader import load_model
from orca_jax.scheduler import SamplingParams
from orca_jax.tokenizer import Tokenizer

Prompt = str | Sequence[int] | dict  # text, token ids, or vLLM's {"prompt_token_ids": ...}
Message = dict[str, Any]  # {"role": ..., "content": ...}


class LLM:
    """Load a model and generate for many prompts at once.

    >>> llm = LLM(model="smollm2-135m", policy="orca")
    >>> [out] = llm.generate(["What is the capital of France?"], SamplingParams(max_tokens=8))
    >>> out.outputs[0].text

    A JAX codebase can serve its own model: pass `params=` (our params tree) and `config=`
    (a `ModelConfig`), and optionally `tokenizer=`.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        weights: str | None = None,
        params: Params | None = None,
        config: ModelConfig | None = None,
        tokenizer: Tokenizer | str | None = None,
        seed: int = 0,
        dtype: str | None = None,
        attention_impl: str | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str | None = None,
        layer_unroll: int | None = None,
        attention_options: str | Mapping[str, int | bool] | None = None,
        speculative_config: Mapping[str, Any] | SpeculativeConfig | None = None,
        **engine_args,
    ):
        """`engine_args`: `EngineConfig` fields. `speculative_config`: vLLM's dict, e.g.
        `{"method": "ngram", "num_speculative_tokens": 3}` (see `engine/speculative.py`).
        `kv_cache_dtype`: "fp8" (or "fp8_e5m2") keeps K/V in 8 bits, twice the tokens per GiB
        of a bf16 cache. `layer_unroll`: layers per iteration of the step's loop over layers
        (`ModelConfig.layer_unroll`; the number of layers unrolls them all).
        `attention_options`: the Pallas kernel's options (`ModelConfig.attention_options`),
        a dict or "fuse_kv_write=true,one_launch=true"."""
        if isinstance(speculative_config, Mapping):
            speculative_config = SpeculativeConfig.from_dict(speculative_config)
        if params is not None:
            if config is None:
                raise ValueError("params= needs config= (a models.ModelConfig) beside it")
            tok = tokenizer if not isinstance(tokenizer, str) else _load_tokenizer(tokenizer)
            if quantization is not None:
                config = config.replace(quantization=quantization)
            if kv_cache_dtype is not None:
                config = config.replace(kv_cache_dtype=kv_cache_dtype)
            if layer_unroll is not None:
                config = config.replace(layer_unroll=layer_unroll)
            if attention_options:
                options = parse_attention_options(attention_options)
                config = config.replace(attention_options=options)
            params = quantize_params(params, config)  # float params of a quantized config
        else:
            loaded = load_model(
                model,
                weights=weights,
                tokenizer=tokenizer if isinstance(tokenizer, str) else None,
                seed=seed,
                dtype=dtype,
                attention_impl=attention_impl,
                quantization=quantization,
                kv_cache_dtype=kv_cache_dtype,
                layer_unroll=layer_unroll,
                attention_options=attention_options,
            )
            config, params = loaded.config, loaded.params
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else loaded.tokenizer
        engine_config = EngineConfig(seed=seed, speculative=speculative_config, **engine_args)
        self.engine = Engine(config, params, tok, engine_config)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        `priority`: one per prompt, lower served first (an engine with
        `scheduling_order="priority"`). `lora_request`: the LoRA adapter of every prompt, or
        one (or None) per prompt (an engine with `enable_lora=True`). A prompt that cannot
        be served raises ValueError before anything runs.
        """
        prompts = _as_list(prompts)
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        loras = _per_prompt(lora_request, len(prompts))
        ids: list[list[str]] = []  # per prompt, one request per completion (params.n)
        try:
            for prompt, p, rank, lora in zip(prompts, params_list, priorities, loras, strict=True):
                ids.append([])
                for j, one in enumerate(p.completions()):
                    if j:  # the prompt is scored once, by completion 0 (see _merge)
                        one = dataclasses.replace(one, prompt_logprobs=None)
                    add = self.engine.add_request
                    ids[-1].append(add(prompt, one, priority=rank, lora_request=lora))
        except ValueError as e:
            for req_id in itertools.chain.from_iterable(ids):  # nothing half-submitted stays
                self.engine.abort(req_id)
            raise ValueError(f"prompt {len(ids) - 1}: {e}") from e
        total = sum(map(len, ids))
        done: dict[str, RequestOutput] = {}
        with tqdm(total=total, disable=not use_tqdm or total < 8, desc="generate") as bar:
            while len(done) < total:
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [_merge([done[i] for i in group]) for group in ids]

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        *,
        use_tqdm: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (`orca_jax.beam_search`): the `beam_width` best beams of each
        prompt (text or token ids), best first. Needs `max_logprobs >= 2 * beam_width`.
        `lora_request`: the LoRA adapter every beam runs with."""
        prompts = [unpack_prompt(p) if isinstance(p, dict) else p for p in _as_list(prompts)]
        tok = self.get_tokenizer()
        if any(isinstance(p, str) for p in prompts) and tok is None:
            raise ValueError("text prompts need a tokenizer: send token ids")
        ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        limit = self.engine.runner.config.max_model_len
        for i, p in enumerate(ids):
            if len(p) + params.max_tokens > limit:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_tokens={params.max_tokens} exceed "
                    f"max_model_len={limit}"
                )
        params.check(self.engine.config.max_logprobs)

        def generate(batch, step):
            return self.generate(batch, step, use_tqdm=use_tqdm, lora_request=lora_request)

        return beam_search(generate, tok, ids, params)

    def render_chat(
        self, messages: Sequence[Message] | Sequence[Sequence[Message]], **options
    ) -> tuple[list[str], list[list[int]]]:
        """One conversation, or a list of them, as the chat template renders them (with
        `options`: `chat_template`, `add_generation_prompt`, ...): the texts, and their token
        ids as the template wrote them (no extra special tokens)."""
        tok = self.get_tokenizer()
        if tok is None or (tok.chat_template is None and options.get("chat_template") is None):
            raise ValueError("this model has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [tok.apply_chat_template(list(c), **options) for c in conversations]
        return texts, [tok.encode(t, add_special_tokens=False) for t in texts]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to each of
        a list of them: rendered by the model's chat template (or `chat_template`) with the
        assistant's turn opened, tokenized as the template wrote it (no extra special
        tokens), generated. Each output's `prompt` is the rendered text.

        As in vLLM: `continue_final_message` (with `add_generation_prompt=False`) leaves
        the last message open for the model to go on; `chat_template_kwargs` and `tools`
        are passed to the template."""
        options = dict(
            chat_template_kwargs or {},
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
        )
        texts, prompts = self.render_chat(messages, **options)
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        for out, text in zip(outs, texts, strict=True):
            out.prompt = text
        return outs


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, a prompt dict) or a list of them, as a list."""
    one = isinstance(prompts, str | dict) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    )
    return [prompts] if one else list(prompts)


def _per_prompt(lora_request, n: int) -> list:
    """One LoRA request (or None) per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    loras = list(lora_request)
    if len(loras) != n:
        raise ValueError(f"{len(loras)} lora requests for {n} prompts")
    return loras


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """The n completions of one prompt as one output (completion j at index j); the first's
    id and prompt logprobs."""
    if len(outs) == 1:
        return outs[0]
    first = outs[0]
    return dataclasses.replace(
        first,
        outputs=[dataclasses.replace(o.outputs[0], index=j) for j, o in enumerate(outs)],
        first_token_time=min(filter(None, (o.first_token_time for o in outs)), default=None),
        last_token_time=max(filter(None, (o.last_token_time for o in outs)), default=None),
    )


def _load_tokenizer(path: str) -> Tokenizer:
    return (
        Tokenizer.from_gguf(path) if path.endswith(".gguf") else Tokenizer.from_pretrained_dir(path)
    )
