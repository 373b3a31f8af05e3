"""The engine: iteration-level scheduling around the model runner (Orca's main loop).

Each `step()` asks the scheduler for one iteration's batch, dispatches it to the device
without waiting (JAX's asynchronous dispatch), and, once `n_workers` batches are in flight or
nothing more can be scheduled, waits for the oldest one and closes it: sampled tokens go back
to the scheduler, finished requests return at once, new ones join at the next iteration.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from models import ModelConfig
from models.layers import Params
from orca_jax.batch_builder import BatchBuilder
from orca_jax.distributed import StepBroadcast
from orca_jax.engine.config import EngineConfig
from orca_jax.engine.lora import LoRAManager, LoRARequest, load_adapter
from orca_jax.engine.outputs import CompletionOutput, Logprob, RequestOutput
from orca_jax.engine.sampling_state import SamplingState
from orca_jax.engine.speculative import NgramIndex, accept, can_speculate
from orca_jax.engine.stop_strings import drop_after, find_stop
from orca_jax.engine.token_history import TokenHistory
from orca_jax.runner import ModelRunner, StepOutputs
from orca_jax.sampler import SamplingMetadata
from orca_jax.scheduler import (
    ModelRunnerOutput,
    Request,
    RequestDelta,
    RequestStatus,
    SamplingParams,
    SchedulerOutput,
    StructuredOutputs,
    make_scheduler,
)
from orca_jax.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:  # imported at the first structured request: outlines-core is needed only then
    from orca_jax.structured import GrammarCompiler, TokenGuide


@dataclasses.dataclass
class _Tracked:
    """The engine's view of one live request: its text stream and cumulative output."""

    output: RequestOutput
    request: Request  # the scheduler's record (its output tokens lead ours under `static`)
    sampling: SamplingState  # what its row of each step's sampling metadata holds
    detok: IncrementalDetokenizer | None
    error: str | None = None  # why it must end now (its automaton refused a sampled token)
    # Per sampled token not yet delivered: (token, its logprob, its rank, the top-n ids,
    # their logprobs), made into {token id: Logprob} when delivered (`_advance`).
    pending_logprobs: list[tuple] = dataclasses.field(default_factory=list)
    ngrams: NgramIndex | None = None  # its n-gram index, when the engine speculates

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling_params


class Engine:
    """Serves requests one iteration at a time; see `add_request`, `step`, `abort`."""

    def __init__(
        self,
        model_config: ModelConfig,
        params: Params,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
    ):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        sched_config, runner_config = config.resolve(model_config)
        self.scheduler = make_scheduler(sched_config)
        self.runner = ModelRunner(model_config, params, runner_config, config.parallel)
        # With several processes (orca_jax.distributed), this one schedules when it is
        # process 0 and sends each step's inputs; the others receive them in `follow`.
        self.broadcast = StepBroadcast() if jax.process_count() > 1 else None
        self.loras = None  # LoRA adapters' slots and waiting requests (engine/lora.py)
        if config.enable_lora:
            load = functools.partial(
                load_adapter, model_config=model_config, max_rank=config.max_lora_rank
            )
            self.loras = LoRAManager(config.max_loras, load, self.runner.set_lora)
        self.batch_builder = BatchBuilder(
            runner_config,
            max_live_reqs=sched_config.num_blocks,
            lora_slots=self.loras.slot_of if self.loras is not None else None,
        )
        self._inflight: collections.deque[tuple[SchedulerOutput, tuple]] = collections.deque()
        self._requests: dict[str, _Tracked] = {}
        self._history = TokenHistory(runner_config.max_model_len)  # penalized requests' tokens
        self._token_texts: list[str] | None = None  # per model token id (logprobs' texts)
        # Requests that asked for prompt logprobs and have not delivered a token yet: the
        # per-iteration scan for prompt tokens to score runs only while there are some.
        self._unscored: set[str] = set()
        self._ids = itertools.count()
        self._seed_rng = np.random.default_rng(config.seed)
        self._grammars: GrammarCompiler | None = None  # built at the first structured request
        self._grammars_lock = threading.Lock()
        self.num_iterations = 0  # batches dispatched
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative decoding: drafts verified ...
        self.num_accepted_tokens = 0  # ... and accepted
        warmup = config.warmup if config.warmup is not None else jax.default_backend() != "cpu"
        if warmup:
            self.runner.warmup(num_top_logprobs=config.max_logprobs)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int] | dict,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Queue a prompt (text or token ids, or vLLM's `{"prompt": text}` /
        `{"prompt_token_ids": ids}`); returns its id. `lora_request`: the adapter to run it
        with (an engine with `enable_lora`).

        Raises ValueError, with the engine unchanged, for input that can never be served
        (empty or too long prompt, out-of-vocabulary ids, a request larger than the cache...).
        """
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(
                f"n={params.n}: the engine serves one completion per request; add one request "
                "per `params.completions()` (as LLM.generate and the server do)"
            )
        if isinstance(prompt, dict):
            prompt = unpack_prompt(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids instead")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        k = params.truncate_prompt_tokens
        if k is not None and len(token_ids) > k:
            text, token_ids = None, token_ids[-k:]  # the text no longer matches the tokens
        bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} outside the vocabulary [0, {self.model_config.vocab_size})"
            )
        if priority and self.config.scheduling_order != "priority":
            raise ValueError(
                f"priority={priority}, but this engine serves first come first served "
                "(scheduling_order='priority', policy 'paged', honours priorities)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > self.config.max_logprobs:
                raise ValueError(
                    f"{name}={n} exceeds the engine's max_logprobs={self.config.max_logprobs}"
                )
        req_id = request_id if request_id is not None else str(next(self._ids))
        if req_id in self._requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        if lora_request is not None:
            if self.loras is None:
                raise ValueError("lora_request needs an engine started with enable_lora=True")
            self.loras.check(lora_request)  # reads the adapter: a bad one is refused here
        sampling = SamplingState.create(
            params,
            tokenizer=self.tokenizer,
            vocab_size=self.model_config.vocab_size,
            mask_words=self.runner.mask_words,
            max_logit_bias=self.config.max_logit_bias,
        )
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        now = time.monotonic() if arrival_time is None else arrival_time
        request = Request(
            req_id,
            token_ids,
            params,
            arrival_time=now,
            priority=priority,
            eos_token_id=eos,
            lora_int_id=lora_request.lora_int_id if lora_request is not None else 0,
        )
        self.scheduler.validate(request)  # lengths and cache fit, before any costly work
        sampling.guide = self._guide(params)
        # Drawn only now: a rejected request leaves the stream of seeds as it was.
        sampling.seed = (
            params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
        )
        if lora_request is None or self.loras.add(req_id, lora_request, request):
            self.scheduler.add_request(request)  # else it waits for a LoRA slot
        detok = (
            IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens
            )
            if self.tokenizer is not None and params.detokenize
            else None
        )
        output = RequestOutput(
            req_id,
            text,
            token_ids,
            [CompletionOutput(0, "", [], logprobs=[] if params.logprobs is not None else None)],
            arrival_time=now,
            # Filled in as the prompt is computed; complete with the first generated token.
            prompt_logprobs=[None] * len(token_ids) if params.prompt_logprobs is not None else None,
        )
        spec = self.config.speculative  # requests that may speculate, once past min_tokens
        ngrams = None
        if spec is not None and can_speculate(params, params.min_tokens):
            ngrams = NgramIndex(spec)
        self._requests[req_id] = _Tracked(output, request, sampling, detok, ngrams=ngrams)
        if params.prompt_logprobs is not None:
            self._unscored.add(req_id)
        return req_id

    def prepare_structured(self, spec: StructuredOutputs) -> None:
        """Build (and cache) the automaton index of a constraint ahead of `add_request`.

        The first use of a regex walks the whole vocabulary, seconds for a large JSON
        schema; outlines-core does it without holding the GIL, so a server calls this from
        a worker thread while the engine's thread keeps iterating. ValueError for a bad
        schema or regex. Thread-safe."""
        self._grammar_compiler().index(spec)

    def _grammar_compiler(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer")
        with self._grammars_lock:
            if self._grammars is None:
                from orca_jax.structured import GrammarCompiler  # noqa: PLC0415

                self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
            return self._grammars

    def _guide(self, params: SamplingParams) -> TokenGuide | None:
        """A fresh automaton for a structured request (ValueError for a bad schema or regex;
        see `prepare_structured` for the cost of a first use)."""
        if params.structured_outputs is None:
            return None
        return self._grammar_compiler().guide(params.structured_outputs)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; True if it was live. Its blocks are freed."""
        self._unscored.discard(request_id)
        if (tracked := self._requests.pop(request_id, None)) is None:
            return False
        tracked.sampling.release(self._history)
        self.scheduler.abort_request(request_id)
        if self.loras is not None:
            self.loras.release(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._inflight)

    # ---- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run (at most) one iteration; return the requests that progressed.

        A batch in flight closes in two halves: `_collect` waits for its tokens and gives
        them to the scheduler, `_emit` does the text work (detokenizing, stop strings,
        outputs). With `async_output` (the default) the next batch is scheduled and
        dispatched between the two, so the device runs it while the host emits: outputs
        come back one `step()` later, and a request that a stop string ends may already
        sit in the next batch (its token there is dropped). Without it, each `step()` emits
        the batch it ran (with `n_workers=1`)."""
        if self.loras is not None and self.loras.num_waiting:
            for request in self.loras.admit():  # a LoRA slot has freed for them
                self.scheduler.add_request(request)
        n_workers = self.scheduler.config.n_workers
        overlap = self.config.async_output
        closed: list[tuple[list[RequestDelta], float]] = []
        if overlap and len(self._inflight) >= n_workers:  # make room for the next batch
            closed.append(self._collect(*self._inflight.popleft()))
        scheduled = False
        if len(self._inflight) < n_workers:
            batch = self.scheduler.schedule()
            self.num_preemptions += len(batch.preempted_req_ids)
            if batch.is_empty:
                self.batch_builder.forget(batch)  # it may report freed requests
                closed.append(self._collect(batch, None))
            else:
                self._inflight.append((batch, self._dispatch(batch)))
                scheduled = True
        full = len(self._inflight) >= n_workers
        if self._inflight and (not scheduled or (full and not overlap)):  # nothing new: drain
            closed.append(self._collect(*self._inflight.popleft()))
        return [out for deltas, now in closed for out in self._emit(deltas, now)]

    def _dispatch(self, batch: SchedulerOutput) -> tuple:
        rows = []
        for s in batch.scheduled:
            tracked = self._requests[s.req_id]
            row = tracked.sampling.row(tracked.request, s.sample, self._history)
            rows.append(row)
            if s.num_draft_tokens:  # a row per draft: the same but for the key's step
                rows.extend(_at_step(row, row[4] + i) for i in range(1, s.num_draft_tokens + 1))
        self.num_iterations += 1
        packed = self.batch_builder.build(batch)
        cfg = self.runner.config
        md = SamplingMetadata.build(
            rows,
            packed.max_reqs,
            cfg.max_model_len,
            cfg.max_logit_bias,
            self.runner.mask_words,
            self._history.table,
        )
        targets = self._prompt_targets(batch, packed.num_tokens)
        if self.broadcast is not None:  # other processes run this step on their devices too
            self.broadcast.send(packed, md, self.config.max_logprobs, targets)
        return self.runner.execute_and_sample(packed, md, self.config.max_logprobs, targets)

    def _scored_spans(self, batch: SchedulerOutput) -> Iterator[tuple[_Tracked, int, int, int]]:
        """`(tracked, packed row of `first`, first, end)` for each request whose prompt
        positions first ... end - 1 this batch scores: position p predicts prompt token
        p + 1. Only requests that asked for prompt logprobs and have no token yet (a prompt
        recomputed after a preemption was delivered already)."""
        if not self._unscored:
            return
        offset = 0
        for s in batch.scheduled:
            tracked = self._requests.get(s.req_id) if s.req_id in self._unscored else None
            if tracked is not None and tracked.request.num_output_tokens == 0:
                end = min(s.start_pos + s.num_tokens, tracked.request.num_prompt_tokens - 1)
                if end > s.start_pos:
                    yield tracked, offset, s.start_pos, end
            offset += s.num_tokens

    def _prompt_targets(self, batch: SchedulerOutput, num_tokens: int) -> np.ndarray | None:
        """i32[T]: the prompt token each scored packed token predicts (-1 elsewhere); None
        when the batch scores none."""
        targets = None
        for tracked, row, first, end in self._scored_spans(batch):
            if targets is None:
                targets = np.full(num_tokens, -1, np.int32)
            targets[row : row + end - first] = tracked.request.prompt_token_ids[first + 1 : end + 1]
        return targets

    def stop_followers(self) -> None:
        """Multi-process runs: tell the other processes' `distributed.follow` loops to end."""
        if self.broadcast is not None:
            self.broadcast.send_stop()

    def _collect(
        self, batch: SchedulerOutput, device_out: StepOutputs | None
    ) -> tuple[list[RequestDelta], float]:
        """First half of closing a batch: wait for its tokens, advance the requests'
        sampling state and give the tokens to the scheduler (the next batch is scheduled
        with them). Returns the scheduler's deltas and when the tokens arrived."""
        sampled, logprobs, refused = {}, {}, []
        if device_out is not None:
            # Python ints and floats once per batch (numpy scalars cost more per row).
            tokens = np.asarray(device_out.tokens).tolist()  # waits for the device
            token_lp = np.asarray(device_out.token_logprobs).tolist()
            top = None  # the top-n ids, logprobs and ranks, fetched if some request wants them
            if device_out.prompt is not None:
                self._record_prompt_logprobs(batch, *(np.asarray(a) for a in device_out.prompt))
            row = 0  # the request's first logits row: one per request, one more per draft
            for s in batch.scheduled:
                first, row = row, row + 1 + s.num_draft_tokens
                if not s.sample:
                    continue
                if s.num_draft_tokens:
                    kept = accept(s.token_ids[-s.num_draft_tokens :], tokens[first:row])
                    self.num_draft_tokens += s.num_draft_tokens
                    self.num_accepted_tokens += len(kept) - 1
                    sampled[s.req_id] = kept
                    logprobs[s.req_id] = token_lp[first : first + len(kept)]
                else:  # one token, no list: this runs for every request every iteration
                    kept = None
                    token = sampled[s.req_id] = tokens[first]
                    logprobs[s.req_id] = token_lp[first]
                tracked = self._requests.get(s.req_id)
                if tracked is None:  # aborted meanwhile
                    continue
                try:
                    if kept is None:
                        tracked.sampling.advance(token)
                    else:
                        for token in kept:
                            tracked.sampling.advance(token)
                except ValueError as e:  # never expected: ends this request, not the loop
                    tracked.error = str(e)
                    refused.append(s.req_id)
                n = tracked.params.logprobs
                if n is not None:
                    if top is None:  # Python values once per batch
                        top = [
                            np.asarray(a).tolist()
                            for a in (device_out.top_ids, device_out.top_logprobs)
                        ]
                        ranks = np.asarray(device_out.token_ranks).tolist()
                    tracked.pending_logprobs.extend(
                        (token, token_lp[r], ranks[r], top[0][r][:n], top[1][r][:n])
                        for r, token in enumerate(kept or (token,), first)
                    )
        deltas = self.scheduler.update(ModelRunnerOutput(batch.batch_id, sampled, logprobs))
        # Ended before the next batch is scheduled (their automaton is past use); `_emit`
        # reports them aborted.
        self.scheduler.finish_requests(refused, RequestStatus.FINISHED_ABORTED)
        if self.config.speculative is not None:
            self._propose(batch)
        return deltas, time.monotonic()

    def _propose(self, batch: SchedulerOutput) -> None:
        """Draft tokens for the requests of `batch` that decode on (speculative decoding):
        at most k, and as many as their max_tokens leaves room for."""
        k = self.config.speculative.num_speculative_tokens
        for s in batch.scheduled:
            tracked = self._requests.get(s.req_id)
            if tracked is None or tracked.ngrams is None or not s.sample:
                continue
            request = tracked.request
            if request.status is not RequestStatus.RUNNING or request.num_uncomputed_tokens != 1:
                continue
            if not can_speculate(request.sampling_params, request.num_output_tokens):
                continue
            slots = min(k, request.num_draft_slots)
            request.spec_token_ids = tracked.ngrams.propose(request.all_token_ids, slots)

    def _emit(self, deltas: list[RequestDelta], now: float) -> list[RequestOutput]:
        """Second half: each delta's text, stop strings and output (`_advance`)."""
        outputs = []
        for delta in deltas:
            tracked = self._requests.get(delta.req_id)
            if tracked is None:  # aborted meanwhile
                continue
            outputs.append(self._advance(tracked, delta, now))
            if tracked.output.finished:
                self._requests.pop(delta.req_id).sampling.release(self._history)
                self._unscored.discard(delta.req_id)
                if self.loras is not None:
                    self.loras.release(delta.req_id)
        return outputs

    def _record_prompt_logprobs(
        self,
        batch: SchedulerOutput,
        target_lp: np.ndarray,  # f32[T]
        top_ids: np.ndarray,  # i32[T, max_logprobs]
        top_lp: np.ndarray,  # f32[T, max_logprobs]
        target_rank: np.ndarray,  # i32[T]
    ) -> None:
        """File each scored prompt token's {token id: Logprob} (the token, then the top n)."""
        for tracked, row0, first, end in self._scored_spans(batch):
            prompt, n = tracked.request.prompt_token_ids, tracked.params.prompt_logprobs
            for pos in range(first, end):
                row = row0 + pos - first
                tracked.output.prompt_logprobs[pos + 1] = self._logprobs(
                    prompt[pos + 1],
                    float(target_lp[row]),
                    int(target_rank[row]),
                    top_ids[row, :n].tolist(),
                    top_lp[row, :n].tolist(),
                )

    def _logprobs(
        self, token: int, logprob: float, rank: int, ids: list[int], lps: list[float]
    ) -> dict[int, Logprob]:
        """{token id: Logprob}: `token` first, then the most likely (`ids`, their `lps`),
        each with its text when there is a tokenizer. Thousands per step when many requests
        ask for logprobs: the entries are built by `map` over C callables."""
        if self._token_texts is None and self.tokenizer is not None:
            vocab = self.model_config.vocab_size  # ids past the tokenizer's have no text
            texts = self.tokenizer.token_texts()
            self._token_texts = texts[:vocab] + [""] * (vocab - len(texts))
        texts = self._token_texts
        names = map(texts.__getitem__, ids) if texts else itertools.repeat(None)
        entry = {token: _new_logprob((logprob, rank, texts[token] if texts else None))}
        top = map(_new_logprob, zip(lps, _RANKS, names, strict=False))  # _RANKS: unbounded
        entry.update(zip(ids, top, strict=True))
        return entry  # `token` first, even when it is among the top

    def _advance(self, tracked: _Tracked, delta, now: float) -> RequestOutput:
        """Apply a scheduler delta: detokenize, look for stop strings, update timestamps.

        Runs for every request every iteration: the plain path (no stop string, no
        min_tokens, one token) does little more than one `detok.push`."""
        out, comp = tracked.output, tracked.output.outputs[0]
        new_ids = delta.new_token_ids  # a fresh list per delta: ours to keep
        comp.delta_token_ids = new_ids
        if out.first_token_time is None and new_ids:
            out.first_token_time = now
            out.num_cached_tokens = tracked.request.num_cached_tokens
            self._unscored.discard(out.request_id)  # its prompt logprobs are complete
        out.last_token_time = now
        comp.token_ids.extend(new_ids)
        if comp.logprobs is not None:
            num_new = len(new_ids)
            comp.logprobs.extend(self._logprobs(*p) for p in tracked.pending_logprobs[:num_new])
            del tracked.pending_logprobs[:num_new]
        finished, reason = delta.finished, delta.finish_reason
        text = ""
        detok = tracked.detok
        if detok is not None:
            params = tracked.params
            # Stop strings count once min_tokens are out: they must end in the text of
            # token min_tokens or later (`floor`: the text before it; None: not reached).
            n_before = len(comp.token_ids) - len(new_ids)
            pieces = [detok.push(tok) for tok in new_ids]  # each token's text
            text = "".join(pieces)
            floor = 0 if n_before >= params.min_tokens else None
            if floor is None and n_before + len(new_ids) >= params.min_tokens:
                floor = len(comp.text) + sum(map(len, pieces[: params.min_tokens - n_before - 1]))
            if finished:
                text += detok.flush()
            stop_at = None
            if text and params.stop and floor is not None:
                stop_at = find_stop(comp.text, text, params.stop, floor)
            if stop_at is not None:
                cut, stop = stop_at
                if len(new_ids) > 1:  # tokens after the one completing the stop are dropped
                    drop_after(comp, new_ids, pieces, cut + len(stop) - len(comp.text))
                if params.include_stop_str_in_output:
                    cut += len(stop)
                text = text[: max(0, cut - len(comp.text))]
                comp.stop_reason = stop
                if not finished:
                    self.scheduler.finish_requests(out.request_id, RequestStatus.FINISHED_STOPPED)
                finished, reason = True, "stop"
            comp.text += text
        comp.delta_text = text
        if tracked.error is not None and not finished:  # its automaton refused a token
            self.scheduler.finish_requests(out.request_id, RequestStatus.FINISHED_ABORTED)
            finished, reason = True, "abort"
        if finished and comp.stop_reason is None and reason == "stop" and comp.token_ids:
            comp.stop_reason = comp.token_ids[-1]
        comp.finish_reason = reason if finished else None
        out.finished = finished
        return out


def unpack_prompt(prompt: dict) -> str | Sequence[int]:
    """vLLM's TextPrompt / TokensPrompt dicts: the text or the token ids."""
    if unknown := sorted(set(prompt) - {"prompt", "prompt_token_ids"}):
        raise ValueError(f"unsupported prompt fields {unknown} (text and token ids only)")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError('a prompt dict has either "prompt" (text) or "prompt_token_ids"')
    return prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]


_new_logprob = functools.partial(tuple.__new__, Logprob)  # Logprob((lp, rank, text)), in C
_RANKS = range(1, 1 << 20)  # of the top tokens, in order


def _at_step(row: tuple, step: int) -> tuple:
    """A sampling row (plain tuple or `RowSampling`) whose key is folded with `step`."""
    return row._replace(step=step) if hasattr(row, "_replace") else (*row[:4], step)
