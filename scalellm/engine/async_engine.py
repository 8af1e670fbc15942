"""Run an LLMEngine on its own thread and talk to it from asyncio.

    event loop (gRPC servicers)                 step thread
    ---------------------------                 -----------
    add / abort / release / reserve_remote /
    remote_kv_landed ---- command queue ------>  the LLMEngine method, between steps
    stream(request_id) <- call_soon_threadsafe -  engine.step() -> TokenEvents
    stats, block hashes <- published -----------  after every step and every command

All engine state is touched by the step thread only; the event loop never runs torch. Torch
releases the GIL inside its kernels, so the loop stays responsive while a step runs. The methods
here are the asyncio face of LLMEngine's lifecycle methods: callers never reach the engine's
internals.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import torch

from scalellm.engine.engine import LLMEngine
from scalellm.engine.events import EngineStats, RemoteReservation, TokenEvent
from scalellm.engine.request import Request
from scalellm.kvhash import BlockHashDelta, BlockHashMirror
from scalellm.types import TokenLogprobs

log = logging.getLogger(__name__)
T = TypeVar("T")

StepHook = Callable[[LLMEngine, list[TokenEvent]], None]
BusyHook = Callable[[bool], None]


class EngineStoppedError(RuntimeError):
    pass


def build_engine(build: Callable[[], LLMEngine]) -> LLMEngine:
    """``build()`` on a thread of its own that exits once the engine is built.

    Why not on the caller's (the event loop's) thread: torch runs CPU kernels on an OpenMP team
    per calling thread (libgomp), and a team's threads spin between kernels only while the
    process holds no more OpenMP threads than CPUs; past that they sleep, and every kernel then
    waits for futex wake-ups. Loading the model on the event loop's thread leaves a team there
    beside the step thread's (2 CPUs: 3 threads), and serving steps took 2-3x their CPU time
    (docs/benchmarks.md, 2026-12-03). A thread's team ends with the thread, so after this
    only the step thread runs torch (the module docstring).
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-load") as pool:
        return pool.submit(build).result()


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, on_step: StepHook | None = None, before_step: BusyHook | None = None
    ) -> None:
        """``on_step`` runs on the step thread after every step with that step's events;
        ``before_step`` runs there before every step with True, and with False each time the
        engine has nothing to do and is about to wait for a command."""
        self.engine = engine
        self._on_step = on_step
        self._before_step = before_step
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[Request, asyncio.Queue[TokenEvent]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stats = engine.stats()
        self._hashes = BlockHashMirror()

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._stopped:
            return
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=30)

    # ---- a request's lifecycle, from the event loop ---------------------------------------

    async def add_and_stream(self, req: Request) -> AsyncIterator[TokenEvent]:
        """Queue a request built by ``engine.make_request`` and yield its events until it
        finishes. Leaving early (the consumer is cancelled or stops iterating) aborts the request
        and frees its blocks."""
        events = self.open_stream(req)
        finished = False
        try:
            await self._submit(lambda e: e.add(req))
            async for event in self.iterate(events):
                finished = event.finished
                yield event
        finally:
            self.close_stream(req)
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> asyncio.Future[None]:
        """Abort the request wherever it is (no-op if finished); await the result to know the
        abort ran, or drop it (fire and forget)."""
        return self._fire(lambda e: e.abort_request(request_id))

    def release(self, request_id: str) -> asyncio.Future[None]:
        """Give back the blocks a finished prefill-only request kept (fire and forget)."""
        return self._fire(lambda e: e.release(request_id))

    async def reserve_remote(self, req: Request) -> RemoteReservation | None:
        """Reserve blocks for a prompt whose KV a prefill worker will push (None: no room now).
        A caller cancelled while this waits must still abort(req.request_id)."""
        return await self._submit(lambda e: e.reserve_remote(req))

    async def remote_kv_landed(
        self, request_id: str, first_token: int, logprobs: TokenLogprobs | None, num_cached_tokens: int
    ) -> TokenEvent:
        """The reserved request's KV has landed: it joins the running batch; its first event."""
        return await self._submit(
            lambda e: e.remote_kv_landed(request_id, first_token, logprobs, num_cached_tokens)
        )

    async def gather_kv(self, block_ids: list[int]) -> torch.Tensor:
        """LLMEngine.gather_kv between steps (a tensor-parallel prefill worker's push)."""
        return await self._submit(lambda e: e.gather_kv(block_ids))

    async def scatter_kv(self, block_ids: list[int]) -> None:
        """LLMEngine.scatter_kv between steps (pushed KV landing on a tensor-parallel worker)."""
        await self._submit(lambda e: e.scatter_kv(block_ids))

    def take_block_hash_delta(self, full: bool = False) -> BlockHashDelta:
        """The prefix-cache hashes added and evicted since the last call (``full``: all of them,
        as a reset), as of the last step or command; never waits for the step under way."""
        return self._hashes.take(full)

    @property
    def stats(self) -> EngineStats:
        """The load after the last step or command (readable from any thread; a barrier()
        that resolved has seen the commands before it counted)."""
        return self._stats

    def barrier(self) -> concurrent.futures.Future[None]:
        """Resolves (on the step thread, so usable from any thread) once every command submitted
        before it has run and every earlier step's events have been handed to the event loop."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._stopped or self._thread is None:
            done.set_result(None)  # no step will run again
        else:
            self._commands.put(lambda: done.set_result(None))
        return done

    # ---- event streams -------------------------------------------------------------------

    def open_stream(self, req: Request) -> asyncio.Queue[TokenEvent]:
        """Start collecting a request's events (call before it can produce any). Events of an
        earlier request that had the same id are not delivered here."""
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[req.request_id] = (req, q)
        return q

    def queued(self, request_id: str) -> int:
        """Events delivered to a request's stream and not yet consumed (0 if it has no stream).

        A consumer that is slower than the steps can take every queued event at once (the next
        ``iterate`` steps return without waiting) and send them on as one message.
        """
        entry = self._streams.get(request_id)
        return entry[1].qsize() if entry is not None else 0

    def close_stream(self, req: Request) -> None:
        entry = self._streams.get(req.request_id)
        if entry is not None and entry[0] is req:
            del self._streams[req.request_id]

    async def iterate(self, events: asyncio.Queue[TokenEvent]) -> AsyncIterator[TokenEvent]:
        while True:
            event = await events.get()
            yield event
            if event.finished:
                return

    # ---- commands ------------------------------------------------------------------------

    def _submit(self, fn: Callable[[LLMEngine], T]) -> asyncio.Future[T]:
        """Run ``fn(engine)`` on the step thread between steps; its result resolves the future."""
        if self._stopped or self._loop is None:
            raise EngineStoppedError("engine is stopped")
        loop = self._loop
        fut: asyncio.Future[T] = loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(command)
        return fut

    def _fire(self, fn: Callable[[LLMEngine], object]) -> asyncio.Future[None]:
        """A command whose result nobody needs; a no-op once the engine has stopped."""
        if self._stopped or self._loop is None:
            done: asyncio.Future[None] = (self._loop or asyncio.get_running_loop()).create_future()
            done.set_result(None)
            return done

        def run(engine: LLMEngine) -> None:
            fn(engine)

        return self._submit(run)

    # ---- the step thread -----------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            if block and self._before_step is not None:
                self._before_step(False)  # about to wait for a command
            try:
                while True:
                    command = self._commands.get(block=block)
                    if command is None:
                        return
                    command()
                    self._publish()
                    block = False
            except queue.Empty:
                pass
            if not engine.has_unfinished():
                continue
            if self._before_step is not None:
                self._before_step(True)
            try:
                events = engine.step()
            except Exception:  # a bug in a step must not kill the worker silently
                log.exception("engine step failed; aborting its requests")
                events = engine.abort_all()
            self._publish()
            if self._on_step is not None:
                self._on_step(engine, events)
            if events and self._loop is not None:
                self._loop.call_soon_threadsafe(self._dispatch, events)

    def _publish(self) -> None:
        """Step thread: the load and the cached block hashes as of now, for readers on any thread."""
        self._stats = self.engine.stats()
        self._hashes.publish(self.engine.take_block_hash_delta())

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            entry = self._streams.get(event.request.request_id)
            if entry is not None and entry[0] is event.request:
                entry[1].put_nowait(event)


def _set_result(fut: asyncio.Future[T], result: T) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[T], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
