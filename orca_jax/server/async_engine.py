"""The engine on its own thread, fed by asyncio handlers.

`Engine` is single-threaded and synchronous; the server's request handlers are coroutines.
`AsyncEngine` owns one thread that runs the engine loop: it takes commands (add, abort) from a
queue between iterations, runs `engine.step()` while any request is live, and hands each
request's progress to its handler's asyncio queue as a snapshot (the engine updates its
`RequestOutput` objects in place). A handler whose client goes away aborts its request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from orca_jax.engine.engine import Engine
from orca_jax.engine.lora import LoRARequest
from orca_jax.engine.outputs import RequestOutput
from orca_jax.scheduler import SamplingParams

log = logging.getLogger(__name__)


class _Stream:
    """Where one request's snapshots go: an asyncio queue on the handler's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Serve `engine` from a background thread; `generate()` is an async iterator."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None  # set if the engine loop died
        # Called on the engine thread with each iteration's outputs (the live objects), before
        # the handlers get their snapshots; the server's metrics hook in here.
        self.observers: list[Callable[[list[RequestOutput]], None]] = []
        self._thread = threading.Thread(target=self._run, name="orca-engine", daemon=True)
        self._thread.start()

    # ---- handler side (asyncio) --------------------------------------------------------------

    async def add(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; once the engine has accepted it, return the iterator of its
        snapshots (one after every iteration it progresses in, the last one finished).

        Raises ValueError, with nothing queued, for a request the engine rejects. Leaving the
        iterator early (a client that went away) aborts the request; a caller that drops it
        unstarted calls `abort()` itself.
        """
        if self.error is not None:
            raise RuntimeError(f"the engine loop has stopped: {self.error!r}")
        if params.structured_outputs is not None:
            # Building an automaton can take seconds (a large JSON schema over the whole
            # vocabulary); it runs here, in a worker thread, not on the engine's thread,
            # so other requests' iterations go on meanwhile. The engine finds it cached.
            await asyncio.to_thread(self.engine.prepare_structured, params.structured_outputs)
        stream = _Stream(asyncio.get_running_loop())
        accepted = stream.loop.create_future()
        self._send(("add", prompt, params, request_id, priority, lora_request, stream, accepted))
        try:
            await accepted  # the engine's ValueError for bad input
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return self._outputs(stream, request_id)

    async def _outputs(self, stream: _Stream, request_id: str) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine loop failed: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op if it already finished or was never accepted)."""
        self._send(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- engine side (its thread) -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._take_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self.deliver(self.engine.step())
        except BaseException as e:  # noqa: BLE001 -- every waiting handler must hear of it
            log.exception("engine loop failed")
            self.error = e
            for stream in self._streams.values():
                stream.put(e)
            self._streams.clear()

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand one iteration's outputs on (engine thread): observers see the live objects,
        each handler gets a snapshot. One wake-up per event loop, not per request: waking a
        loop from another thread writes to its self-pipe, and an iteration may progress
        hundreds of requests."""
        for observe in self.observers:
            observe(outputs)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batches.setdefault(stream.loop, []).append((stream, out.snapshot()))
            if out.finished:
                del self._streams[out.request_id]
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _take_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, prompt, params, request_id, priority, lora, stream, accepted = command
                try:
                    self.engine.add_request(
                        prompt, params, request_id=request_id, priority=priority, lora_request=lora
                    )
                except ValueError as e:
                    stream.loop.call_soon_threadsafe(_settle, accepted, e)
                    continue
                self._streams[request_id] = stream
                stream.loop.call_soon_threadsafe(_settle, accepted, None)
            elif command[0] == "abort":
                self.engine.abort(command[1])
                self._streams.pop(command[1], None)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the handler was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
