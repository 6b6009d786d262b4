"""Prefill worker core: runs prompts to their first token and pushes their KV per layer.

A request's life on this worker, in order:
    1. prefill(rid, prompt, params, lease)  joins the engine's waiting queue with a
       kv_sink bound to a Transfer toward the lease's decode worker
    2. engine loop      batches it with other prompts under the token budget
                        (chunked; prefix-cached blocks are reused, and still sent)
    3. per layer        as each layer's K/V is computed the sink queues it; the
                        sender thread pushes it while later layers compute
    4. first token      sampled; DONE carries it to the decode worker
    5. result           prefill() returns the first token once DONE was taken,
                        or raises TransferError; the engine's blocks stay prefix-cached
"""
from __future__ import annotations

from concurrent.futures import Future, InvalidStateError

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loop import EngineLoop
from engine.output_processor import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import Lease, Link, TransferError
from kv_transfer.sender import KVSender, Transfer


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Resolve once: a cancel and a transfer's end may race to settle the same future."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


class PrefillCore(EngineLoop):
    def __init__(self, config: EngineConfig, link: Link, engine: Engine | None = None,
                 send_timeout_s: float = 30.0):
        super().__init__(engine or Engine(config), "prefill-loop")
        self.sender = KVSender(link, send_timeout_s)
        self._pending: dict[str, tuple[Transfer, Future]] = {}
        self.start_loop()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               lease: Lease) -> Future:
        """Queues the prompt; the future resolves to the first token once its KV was delivered."""
        if lease.model_fingerprint != self.engine.model_config.fingerprint:
            raise TransferError(f"lease for {request_id!r} is for model {lease.model_fingerprint!r}, "
                                f"this worker serves {self.engine.model_config.fingerprint!r}")
        transfer = self.sender.open(lease)
        future: Future = Future()
        with self.lock:
            self.engine.add_request(prompt_token_ids, params, request_id=request_id,
                                    prefill_only=True, kv_sink=transfer.sink)
            self._pending[request_id] = (transfer, future)
            self.notify()
        return future

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                lease: Lease, timeout_s: float = 60.0) -> int:
        return self.submit(request_id, prompt_token_ids, params, lease).result(timeout_s)

    def cancel(self, request_id: str) -> bool:
        with self.lock:
            entry = self._pending.pop(request_id, None)
            self.engine.abort(request_id)
        if entry is None:
            return False
        transfer, future = entry
        transfer.abort("cancelled on the prefill side")
        _settle(future, error=TransferError(f"{request_id!r} was cancelled"))
        return True

    def stats(self) -> dict:
        with self.lock:
            e, s = self.engine, self.sender.stats
            return dict(queue_depth=len(self._pending), waiting=len(e.scheduler.waiting),
                        running=len(e.scheduler.running), kv_blocks_used=e.kv.pool.num_used,
                        kv_blocks_total=e.kv.num_blocks, prefix_cache_hits=e.kv.pool.hits,
                        prefix_cache_queries=e.kv.pool.queries, bytes_sent=s.bytes_sent,
                        transfers_done=s.transfers_done, transfers_failed=s.transfers_failed,
                        send_seconds=s.send_seconds, prompt_tokens=e.stats.num_computed_tokens)

    def close(self) -> None:
        self.stop_loop()
        self.sender.close()

    def _finish(self, out: RequestOutput) -> None:
        """The request's first token exists: send DONE, resolve once it is delivered."""
        entry = self._pending.pop(out.request_id, None)
        if entry is None:
            return
        transfer, future = entry
        if not out.new_token_ids:  # aborted or no room: nothing to hand over
            transfer.abort(f"prefill ended without a token ({out.finish_reason})")
            _settle(future, error=TransferError(f"prefill of {out.request_id!r} ended: "
                                                f"{out.finish_reason}"))
            return
        first = out.new_token_ids[0]

        def resolve(t: Transfer) -> None:
            error = None if t.error is None else TransferError(
                f"KV transfer of {out.request_id!r} failed: {t.error}")
            _settle(future, first, error)

        transfer.add_done_callback(resolve)
        transfer.finish(first)

    def step_locked(self) -> list:
        for out in self.engine.step():
            if out.finished:
                self._finish(out)
        return []
