"""The engine: requests in, token deltas out, one `step()` at a time.

    step: schedule -> prepare + execute -> sample -> update

The prefill pool adds requests with `prefill_only=True` and a `kv_sink`; the
decode pool reserves blocks, lets the KV land in them, then adds the request with
`add_prefilled_request` and decodes from there.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.loader import load_model_config, load_tokenizer, load_weights, resolve_model_dir
from engine.model_runner import ModelRunner
from engine.models.llama import LlamaModel
from engine.output_processor import OutputProcessor, RequestOutput
from engine.request import FinishReason, KVSink, Request, RequestStatus
from engine.sampler import Sampler, SamplingState, make_generator, skip_draws
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.runtime import keep_freed_memory, release_freed_memory
from engine.scheduler import Scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls are 5-20x slower than fp32 on CPUs without AVX-512/AMX.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type == "cpu":
        raise InvalidRequestError("dtype", "float16 is only supported on GPU; use float32 or bfloat16")
    return getattr(torch, name)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_preemptions: int = 0
    max_step_tokens: int = 0  # the most tokens one step computed
    num_computed_tokens: int = 0
    num_generated_tokens: int = 0


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model_dir = resolve_model_dir(config.model)
        self.model_config = load_model_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        weights = load_weights(self.model_dir, self.model_config, self.dtype)
        self.model = LlamaModel(self.model_config, weights, self.device, self.dtype)
        del weights
        if self.device.type == "cpu":
            release_freed_memory()  # the plain copies of the weights packed at load
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.kv = KVCache(self.model_config, config.cache, self.dtype, self.device)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError("prompt", "is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"has {len(prompt_token_ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens including at least one generated token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} is outside [0, {vocab})")
        if self.kv.blocks_for(len(prompt_token_ids) + 1) > self.kv.num_blocks:
            raise InvalidRequestError(
                "prompt", f"has {len(prompt_token_ids)} tokens, more than this engine's KV cache "
                f"holds ({self.kv.num_blocks * self.kv.block_size} tokens)")

    def _new_request(self, request_id: str | None, prompt_token_ids: Sequence[int],
                     params: SamplingParams, **kwargs) -> Request:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        self.validate_prompt(prompt_token_ids)
        prompt = list(prompt_token_ids)
        state = SamplingState(params, prompt, [], make_generator(params, self.device))
        req = Request(request_id, prompt, params, state, **kwargs)
        self.requests[request_id] = req
        self.outputs.add(req)
        return req

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, prefill_only: bool = False,
                    kv_sink: KVSink | None = None) -> str:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        req = self._new_request(request_id, ids, params, prefill_only=prefill_only, kv_sink=kv_sink)
        self.scheduler.add(req)
        return req.request_id

    def reserve_blocks(self, num_tokens: int) -> list[int]:
        """Blocks for a prompt whose KV will be written from outside (the decode side of a transfer)."""
        return self.kv.pool.allocate(self.kv.blocks_for(num_tokens))

    def release_blocks(self, block_ids: Sequence[int]) -> None:
        self.kv.pool.free(block_ids)

    def add_prefilled_request(self, prompt_token_ids: Sequence[int], first_token_id: int,
                              block_ids: list[int], params: SamplingParams = SamplingParams(),
                              request_id: str | None = None) -> RequestOutput:
        """Starts decoding from KV already in `block_ids` (which the request now owns) plus the
        first token the prefill side sampled. Returns the output for that first token."""
        req = self._new_request(request_id, prompt_token_ids, params)
        skip_draws(req.sampling, 1)  # the prefill side drew the first token
        req.block_ids = list(block_ids)
        req.num_computed_tokens = len(prompt_token_ids)
        out, reason = self.outputs.append_token(req, first_token_id, None)
        if reason is not None:
            self._finish(req, reason)
        else:
            self.scheduler.add(req)
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT)
        return self.outputs_finished(req)

    def outputs_finished(self, req: Request) -> RequestOutput:
        return self.outputs.finished_output(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status == RequestStatus.FINISHED:
            return
        self.scheduler.finish(req, reason)
        if req.status != RequestStatus.FINISHED:  # it held blocks outside the scheduler
            self.kv.pool.free(req.block_ids)
            req.block_ids, req.status, req.finish_reason = [], RequestStatus.FINISHED, reason
        self.requests.pop(req.request_id, None)
        self.outputs.remove(req.request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step ------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.stats.num_preemptions += len(sched.preempted)
        outputs = []
        for req in sched.finished:
            self._finish(req, req.finish_reason or FinishReason.LENGTH)
            outputs.append(self.outputs_finished(req))
        if not sched.scheduled:
            return outputs
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += sched.num_tokens
        self.stats.max_step_tokens = max(self.stats.max_step_tokens, sched.num_tokens)
        inputs = self.runner.prepare(sched.scheduled)
        self.stats.num_generated_tokens += len(inputs.sampled)
        logits = self.runner.execute(inputs)
        sampled = self.sampler(logits, [item.request.sampling for item in inputs.sampled])
        self.scheduler.update(sched)
        for item, token_id, logprobs in zip(inputs.sampled, sampled.token_ids, sampled.logprobs):
            req = item.request
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            out, reason = self.outputs.append_token(req, token_id, logprobs)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(out)
        return outputs

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Offline: run every prompt to completion, batched; results in prompt order."""
        per_prompt = params if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        prompt_ids = {rid: list(self.requests[rid].prompt_token_ids) for rid in ids}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        reasons: dict[str, FinishReason | None] = {}
        while self.has_unfinished:
            for out in self.step():
                tokens[out.request_id] += out.new_token_ids
                texts[out.request_id].append(out.new_text)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        return [Completion(rid, prompt_ids[rid], tokens[rid], "".join(texts[rid]), reasons.get(rid))
                for rid in ids]
