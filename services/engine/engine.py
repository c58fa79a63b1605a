"""The in-process engine: requests in, tokens out, one scheduling step at a time.

    add_request ──► Scheduler.waiting ──schedule──► ModelRunner.execute ──► sample
                                                                             │
    RequestOutput ◄── OutputTracker (text, stop checks) ◄── append token ◄───┘

Memory: the ModelRunner owns the KV cache tensor, the BlockManager owns which blocks
each request holds, and the scheduler frees a request's blocks when it finishes, is
aborted or is preempted. A request added with ``export_kv=True`` has its KV copied out
in the step that finishes it, before its blocks are freed, the copy on its last output
(how a prefill worker hands KV on, without waiting for another step).

Decode steps may run one ahead of their results (overlap.py, ``EngineConfig.overlap_decode``):
a step() then launches the next decode step before it reads the tokens of the one in
flight, and returns those. Between steps one decode step may be in flight, its positions
already counted as computed; ``export_kv`` reads it back first (its outputs come with the
next step()).
Not thread-safe: one caller drives ``step()``.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.decode_graphs import FedTokens
from services.engine.engine_stats import EngineStats
from services.engine.errors import CapacityError, DeviceMemoryError, InvalidRequestError
from services.engine.kv_export import KVExport
from services.engine.loader import load_model, model_fingerprint
from services.engine.model import CausalLM
from services.engine.model_runner import ModelRunner
from services.engine.overlap import LaunchedStep, TokenReadback, rows_ahead
from services.engine.request import Completion, FinishReason, Request, RequestOutput, SamplingParams
from services.engine.sampler import SampleInput, logprobs_list, sample, sample_on_device
from services.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput, is_prompt_work
from services.engine.step_budget import StepTimeBudget
from services.engine.stop_checker import OutputTracker
from services.engine.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 512 << 20
EXPORT_DEVICE_BYTES = 1 << 30
"""A request's exported KV up to this size is a device tensor; larger (a long prompt), it goes
to host memory a layer at a time: a 128K-token prompt of an 8B model is 16 GiB of KV, more
than a worker has beside its cache."""
_GPU_FREE_MEMORY_FRACTION = 0.9


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: TextTokenizer | None, config: EngineConfig, fingerprint: str):
        self.model_config = model.config
        self.config = config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        dtype = model.model.embed_tokens.weight.dtype
        device = model.model.embed_tokens.weight.device
        _cap_device_memory(config, device)
        per_block = ModelRunner.bytes_per_block(model, config.block_size, dtype)
        num_blocks = _kv_cache_bytes(config, device) // per_block
        self.max_model_len = _max_model_len(config, model.config.max_position_embeddings, num_blocks)
        model.init_rotary(self.max_model_len)
        self.runner = ModelRunner(model, num_blocks, config.block_size, dtype, device)
        if config.decode_graphs == "eager" or (config.decode_graphs == "auto" and device.type == "cuda"):
            capture = config.decode_graphs == "auto"
            self.runner.enable_decode_graphs(self.max_model_len, config.graph_batch_limit(), capture)
            mixed_tokens = min(config.mixed_graph_tokens, config.scheduler.max_num_batched_tokens)
            if mixed_tokens > 1:
                self.runner.enable_mixed_graphs(mixed_tokens, capture)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, fingerprint.encode())
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self._requests: dict[str, Request] = {}
        self._trackers: dict[str, OutputTracker] = {}
        self._export_on_finish: set[str] = set()
        self._reserved: dict[str, int] = {}  # request id -> tokens of KV expected
        self.stats = EngineStats()
        target = config.scheduler.step_target_s
        self._step_budget = None if target is None else StepTimeBudget(target, config.scheduler.max_num_batched_tokens)
        """Prompt tokens per step beside decodes, from a step time target (step_budget.py)."""
        self._overlap = _overlap_enabled(config.overlap_decode, self.runner)
        self._readback = TokenReadback(config.graph_batch_limit(), device) if self._overlap else None
        self._launched: LaunchedStep | None = None
        """A decode step launched ahead whose tokens have not been read (overlap only)."""
        self._settled: list[RequestOutput] = []
        """Outputs of a launched step read between steps, returned by the next step()."""
        self._plan: SchedulerOutput | None = None
        """The step scheduled last (its requests stop if it runs out of device memory)."""
        log.info("engine ready: %d KV blocks of %d tokens, max_model_len %d", num_blocks, config.block_size,
                 self.max_model_len)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig | None = None) -> "LLMEngine":
        config = config or EngineConfig()
        model = load_model(model_dir, config.dtype, config.device)
        return cls(model, TextTokenizer.from_model_dir(model_dir), config, model_fingerprint(model_dir))

    # -- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        export_kv: bool = False,
        generated: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Queue a request. Raises InvalidRequestError (engine unchanged) on bad input.

        ``export_kv``: the step that finishes the request exports its KV onto the last output
        (``RequestOutput.kv``) before freeing the blocks (full ones stay in the prefix cache).

        ``generated``: tokens this request already produced elsewhere (a request resumed on
        another worker); they are computed like the prompt and count towards max_tokens.
        """
        params = params or SamplingParams()
        request = self._new_request(request_id, self._encode_prompt(prompt), params, list(generated))
        self._register(request)
        if export_kv:
            self._export_on_finish.add(request_id)
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is not known (or already done)."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        request.finish_reason = FinishReason.ABORT
        self.scheduler.finish(request)
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._launched is not None or bool(self._settled)

    # -- stepping ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; returns what each scheduled request produced."""
        if self._settled:
            outputs, self._settled = self._settled, []
            return outputs
        try:
            return self._step()
        except torch.OutOfMemoryError as e:
            raise self._out_of_memory(e) from e

    def _step(self) -> list[RequestOutput]:
        if self._launched is not None:
            self._plan = None  # the step in flight is its requests
            return self._step_ahead()
        start = time.perf_counter()
        plan = self._plan = self.scheduler.schedule(self._prompt_limit())
        if not plan.chunks:
            return []
        if self._overlap and self.runner.is_decode_step(plan) and all(c.completes for c in plan.chunks):
            self._launched = self._launch_scheduled(plan, start)
            return self._step_ahead()
        return self._run_plan(plan, start)

    def _prompt_limit(self) -> int | None:
        """The prompt work the next step may carry beside its decodes (None: the token budget's)."""
        if self._step_budget is None:
            return None
        rows = self.scheduler.decoding_rows()
        return self._step_budget.prompt_tokens(rows) if rows else None

    def _record(self, plan: SchedulerOutput, host_s: float, step_s: float) -> None:
        """Count a step whose ``step_s`` spans its device work (run one at a time, or a step ahead
        read back), and let the step budget learn from it."""
        self.stats.record(plan, host_s=host_s, step_s=step_s)
        if self._step_budget is not None and plan.chunks:
            prompt = [c.num_tokens for c in plan.chunks if is_prompt_work(c.request, c.start, c.num_tokens)]
            self._step_budget.observe(sum(prompt), len(plan.chunks) - len(prompt), step_s)

    def _run_plan(self, plan: SchedulerOutput, start: float) -> list[RequestOutput]:
        """Run a scheduled step one at a time: the device computes, the host then samples."""
        tables = {c.request.request_id: self.blocks.block_table(c.request.request_id) for c in plan.chunks}
        logits = self.runner.execute(plan, tables)
        launched = self.runner.launched_at
        # While the device runs the step: the bookkeeping that does not need its logits. The
        # blocks' KV is written by work already queued, before anything that could read them.
        completing = [c for c in plan.chunks if c.completes]
        inputs = [self._sample_input(c.request) for c in completing]
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.blocks.cache_full_blocks(chunk.request.request_id, chunk.request.token_ids,
                                          chunk.request.num_computed_tokens)
        self.runner.synchronize()  # on GPU: the host now waits for the step (sampling needs its logits)
        computed = time.perf_counter()
        tokens, logprobs = sample(logits, inputs)
        outputs = []
        for chunk, token, logprob in zip(completing, tokens, logprobs):
            outputs.append(self._append_token(chunk.request, token, logprob))
        self._record(plan, host_s=(launched - start) + (time.perf_counter() - computed),
                     step_s=time.perf_counter() - start)
        return outputs

    def _out_of_memory(self, error: torch.OutOfMemoryError) -> DeviceMemoryError:
        """Stop every request of a step that ran out of device memory (whatever it produced is
        lost with it) and give the allocator's cached blocks back: the next steps, and the other
        processes on the device, get the memory again. With a decode step in flight (overlap),
        the device finishes it first (it writes blocks about to be freed), and every running
        request stops: the step after it may have taken requests that joined since."""
        requests = [c.request for c in self._plan.chunks] if self._plan is not None else []
        if self._launched is not None:
            self.runner.synchronize()
            requests += [*self._launched.requests, *self.scheduler.running]
            self._launched = None
        ids = list(dict.fromkeys(r.request_id for r in requests))
        for request_id in ids:
            self.abort(request_id)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("a step of %d request(s) ran out of device memory; they were stopped", len(ids))
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return DeviceMemoryError(ids, f"out of device memory in a step of {len(ids)} request(s): {first_line}")

    # -- decode steps one ahead of their results (overlap.py) ------------------------------

    def _launch_scheduled(self, plan: SchedulerOutput, start: float) -> LaunchedStep:
        """Launch a scheduled decode step (every chunk one token, each sampling) without waiting."""
        tables = {c.request.request_id: self.blocks.block_table(c.request.request_id) for c in plan.chunks}
        logits = self.runner.execute(plan, tables)
        launched = self.runner.launched_at
        inputs = [self._sample_input(c.request) for c in plan.chunks]
        for chunk in plan.chunks:
            self._account(chunk.request)
        step = self._sample_ahead(plan, logits, inputs)
        # its step_s is the launch alone: not a step time for the step budget to learn from
        self.stats.record(plan, host_s=launched - start, step_s=time.perf_counter() - start)
        return step

    def _step_ahead(self) -> list[RequestOutput]:
        """Launch the step after the one in flight if no scheduling is needed, then read the
        one in flight; returns its outputs."""
        start = time.perf_counter()
        current = self._launched
        following = self._launch_following(current)
        launched = self.runner.launched_at
        outputs, tokens_at = self._read(current)
        if following is not None:
            self.stats.steps_ahead += 1
            for r in following.requests:
                if self._requests.get(r.request_id) is r:  # not finished by the step just read
                    self._account(r)
                else:
                    self.stats.wasted_tokens += 1
        self._launched = following
        end = time.perf_counter()
        plan = following.plan if following is not None else SchedulerOutput()
        self._record(plan, host_s=(launched - start) if following is not None else end - tokens_at,
                     step_s=end - start)
        return outputs

    def _launch_following(self, current: LaunchedStep) -> LaunchedStep | None:
        rows = rows_ahead(self.scheduler, self.blocks, current, self.max_model_len, self.runner.decode_graphs.max_batch)
        if rows is None:
            return None
        fed = [source for _, source in rows if source is not None]
        runner_rows = [(0 if source is not None else r.token_ids[r.num_computed_tokens], r.num_computed_tokens,
                        self.blocks.block_table(r.request_id)) for r, source in rows]
        logits = self.runner.execute_decode_rows(runner_rows, FedTokens(current.tokens, fed))
        inputs = [self._sample_input(r, ahead=int(source is not None)) for r, source in rows]
        plan = SchedulerOutput([ScheduledChunk(r, r.num_computed_tokens, 1) for r, _ in rows])
        return self._sample_ahead(plan, logits, inputs)

    def _sample_ahead(self, plan: SchedulerOutput, logits: torch.Tensor, inputs: list[SampleInput]) -> LaunchedStep:
        tokens, logprobs = sample_on_device(logits, inputs)
        return LaunchedStep(plan, tokens, self._readback.start(tokens, logprobs), inputs)

    def _read(self, step: LaunchedStep) -> tuple[list[RequestOutput], float]:
        """Wait for a launched step's tokens and emit them (rows of requests gone since are
        dropped); returns the outputs and the perf_counter() when the tokens were back."""
        tokens, logprobs = step.copy.wait()
        tokens_at = time.perf_counter()
        outputs = []
        for r, token, logprob in zip(step.requests, tokens, logprobs_list(logprobs, step.inputs)):
            if self._requests.get(r.request_id) is r:
                outputs.append(self._append_token(r, token, logprob))
        return outputs, tokens_at

    def _account(self, r: Request) -> None:
        """One more of ``r``'s tokens has its KV computed (or queued to be)."""
        r.num_computed_tokens += 1
        self.blocks.cache_full_blocks(r.request_id, r.token_ids, r.num_computed_tokens)

    def _settle(self) -> None:
        """Read the step in flight now; its outputs go out with the next step()."""
        if self._launched is not None:
            step, self._launched = self._launched, None
            self._settled.extend(self._read(step)[0])

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Run prompts to completion (batched with whatever else is queued) and return them in order."""
        ids = [f"generate-{i}-{random.getrandbits(32):08x}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts):
            self.add_request(request_id, prompt, params)
        parts: dict[str, list[RequestOutput]] = {i: [] for i in ids}
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id in parts:
                    parts[out.request_id].append(out)
                    if out.finished:
                        done[out.request_id] = Completion.from_outputs(parts.pop(out.request_id))
        return [done[i] for i in ids]

    # -- KV export / import ---------------------------------------------------------------

    def export_kv(self, request_id: str) -> KVExport:
        """Copy of an unfinished request's computed KV (between steps)."""
        self._settle()
        return self._export(request_id)

    def _export(self, request_id: str) -> KVExport:
        r = self._requests.get(request_id)
        if r is None or r.num_computed_tokens == 0:
            raise InvalidRequestError(f"request {request_id!r} has no KV to export")
        table = self.blocks.block_table(request_id)[: self.blocks.blocks_needed(r.num_computed_tokens)]
        return KVExport(self.fingerprint, self.config.block_size, list(r.prompt_token_ids), r.output_token_ids,
                        r.num_computed_tokens, self.runner.read_blocks(table, EXPORT_DEVICE_BYTES))

    def release(self, request_id: str) -> bool:
        """Free a reservation that will not be committed; False if there is none."""
        if self._reserved.pop(request_id, None) is None:
            return False
        self.blocks.free(request_id)
        return True

    def load_prefix(self, token_ids: list[int], kv: torch.Tensor) -> int:
        """Put KV computed elsewhere (e.g. fetched from the KV store) into the prefix cache.

        ``kv`` is [L, 2, n_blocks, block_size, Hkv, D] for the first ``n_blocks`` full blocks of
        ``token_ids``. The blocks are filled, registered under their hash chain and released at
        once: they stay cached (evictable) so that a request with this prefix, added next,
        starts after it. Returns the number of tokens made available (0 if there was no room).
        """
        bs = self.config.block_size
        n_blocks = kv.shape[2]
        if n_blocks == 0 or n_blocks * bs > len(token_ids):
            raise InvalidRequestError(f"KV for {n_blocks} blocks does not match {len(token_ids)} tokens")
        tokens = token_ids[: n_blocks * bs]
        if len(self.blocks.match_prefix(tokens + [0])) >= n_blocks:
            return n_blocks * bs  # already cached here
        loader_id = f"prefix-load-{random.getrandbits(64):016x}"
        if not self.blocks.can_allocate(loader_id, len(tokens)):
            return 0
        self.blocks.allocate(loader_id, len(tokens))
        try:
            self.runner.write_blocks(self.blocks.block_table(loader_id), kv)
            self.blocks.cache_full_blocks(loader_id, tokens, len(tokens))
        finally:
            self.blocks.free(loader_id)
        return len(tokens)

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        """Allocate blocks for ``num_tokens`` of KV that another engine will write; they stay
        out of the batch until :meth:`commit_reserved` (or are freed by :meth:`release`)."""
        if request_id in self._requests or request_id in self._reserved:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not 0 < num_tokens < self.max_model_len:
            raise InvalidRequestError(f"cannot reserve {num_tokens} tokens (context length {self.max_model_len})")
        if not self.blocks.can_allocate(request_id, num_tokens):
            raise CapacityError(f"no room for {num_tokens} tokens of KV "
                                f"({self.blocks.num_free_blocks} free blocks of {self.config.block_size})")
        self._reserved[request_id] = num_tokens
        return self.blocks.allocate(request_id, num_tokens)

    def write_reserved(self, request_id: str, kv: torch.Tensor, layers: slice = slice(None)) -> None:
        """Fill a reservation's blocks from kv [L, 2, num_blocks, block_size, Hkv, D], or only the
        ``layers`` of them that kv holds."""
        table = self.blocks.block_table(request_id)
        if request_id not in self._reserved or kv.shape[2] != len(table):
            raise InvalidRequestError(f"KV of {kv.shape[2]} blocks does not fit reservation {request_id!r}")
        self.runner.write_blocks(table, kv, layers)

    def commit_reserved(self, request_id: str, prompt: list[int], generated: list[int], num_computed_tokens: int,
                        params: SamplingParams | None = None) -> None:
        """Join a filled reservation to the batch; generation continues after ``generated``."""
        reserved = self._reserved.get(request_id)
        if reserved is None or num_computed_tokens != reserved:
            raise InvalidRequestError(f"no reservation of {num_computed_tokens} tokens for {request_id!r}")
        request = self._new_request(request_id, self._encode_prompt(prompt), params or SamplingParams(),
                                    list(generated))
        if not 0 < num_computed_tokens < request.num_tokens:
            raise InvalidRequestError("committed KV must cover a prefix of the tokens, short of the last one")
        del self._reserved[request_id]
        request.num_computed_tokens = num_computed_tokens  # computed elsewhere: not a prefix-cache hit
        self.blocks.cache_full_blocks(request_id, request.token_ids, num_computed_tokens)
        self._register(request)
        self.scheduler.add_running(request)

    def import_request(self, request_id: str, kv: KVExport, params: SamplingParams | None = None) -> None:
        """Continue a request from another engine's export, exactly where the exporter stopped."""
        self._check_import(kv)
        self.reserve(request_id, kv.num_computed_tokens)
        try:
            self.write_reserved(request_id, kv.kv)
            self.commit_reserved(request_id, kv.prompt_token_ids, kv.output_token_ids, kv.num_computed_tokens, params)
        except Exception:
            self.release(request_id)
            raise

    # -- internals -------------------------------------------------------------------------

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer.json; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def _new_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     generated: list[int]) -> Request:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if generated:
            self._encode_prompt(generated)  # same id checks as the prompt
            if params.max_tokens is not None and len(generated) >= params.max_tokens:
                raise InvalidRequestError(f"{len(generated)} tokens already generated; max_tokens is {params.max_tokens}")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens but the context length is {self.max_model_len} "
                "(prompt + at least one generated token must fit)"
            )
        room = self.max_model_len - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context length "
                f"{self.max_model_len}; at most {room} tokens can be generated"
            )
        vocab = self.model_config.vocab_size
        if not all(0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})")  # masked by id when sampling
        if n + len(generated) >= self.max_model_len:
            raise InvalidRequestError(f"prompt + generated tokens ({n + len(generated)}) fill the context length")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request = Request(request_id, prompt_ids, params, seed=seed, max_tokens=params.max_tokens or room,
                          token_ids=prompt_ids + generated)
        if generated and self.tokenizer is not None:
            request.output_text = self.tokenizer.decode(generated)  # already shown by whoever produced it
        return request

    def _register(self, request: Request) -> None:
        self._requests[request.request_id] = request
        eos = self.model_config.eos_token_ids
        self._trackers[request.request_id] = OutputTracker(request, self.tokenizer, eos)

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._trackers.pop(request_id, None)
        self._export_on_finish.discard(request_id)

    def _check_import(self, kv: KVExport) -> None:
        if kv.model_fingerprint != self.fingerprint:
            raise InvalidRequestError("KV was exported by a different model")
        c = self.model_config
        expected = (c.num_layers, 2, self.config.block_size, c.num_kv_heads, c.head_dim)
        got = (kv.kv.shape[0], kv.kv.shape[1], kv.block_size, kv.kv.shape[4], kv.kv.shape[5])
        if got != expected:
            raise InvalidRequestError(f"KV layout {got} does not match this engine's {expected}")

    def _sample_input(self, r: Request, ahead: int = 0) -> SampleInput:
        """For ``r``'s next token, or (``ahead``) the one after a token not appended yet."""
        return SampleInput(r.params, r.seed, r.num_output_tokens + ahead,
                           self._trackers[r.request_id].banned_token_ids(ahead))

    def _append_token(self, r: Request, token: int, logprob: float | None) -> RequestOutput:
        tracker = self._trackers[r.request_id]
        r.append_token(token, logprob)
        reason = tracker.on_token(token, self.max_model_len)
        kv = None
        if reason is not None:
            tracker.on_finish(reason)
            r.finish_reason = reason
            if r.request_id in self._export_on_finish:
                kv = self._export(r.request_id)  # before finish() frees the blocks
            self.scheduler.finish(r)
            self._forget(r.request_id)
        return RequestOutput(
            request_id=r.request_id,
            new_token_ids=[token],
            new_text=tracker.take_text(finished=reason is not None),
            new_logprobs=[logprob] if logprob is not None else [],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(r.prompt_token_ids),
            num_output_tokens=r.num_output_tokens,
            num_cached_prompt_tokens=r.num_cached_prompt_tokens,
            kv=kv,
        )


def _overlap_enabled(mode: str, runner: ModelRunner) -> bool:
    if mode == "off" or runner.decode_graphs is None:
        return False
    return mode == "on" or runner.device.type == "cuda"


def _cap_device_memory(config: EngineConfig, device: torch.device) -> None:
    if config.device_memory_bytes is None or device.type != "cuda":
        return
    _, total = torch.cuda.mem_get_info(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, config.device_memory_bytes / total), device)
    log.info("device memory capped at %.1f GiB of %.1f GiB", config.device_memory_bytes / (1 << 30), total / (1 << 30))


def _kv_cache_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _GPU_FREE_MEMORY_FRACTION)
    return _CPU_DEFAULT_KV_BYTES


def _max_model_len(config: EngineConfig, max_positions: int, num_blocks: int) -> int:
    capacity = num_blocks * config.block_size
    if config.max_model_len is not None:
        if config.max_model_len > capacity:
            raise CapacityError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len={config.max_model_len}; "
                "give it more memory or lower max_model_len"
            )
        return config.max_model_len
    length = min(max_positions, capacity)
    if length < 2:
        raise CapacityError(f"the KV cache holds only {capacity} tokens; give it more memory")
    return length
