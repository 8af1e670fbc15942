"""The baseline a user would write: transformers `generate` behind a plain OpenAI-style HTTP server.

One request at a time under a lock (no batching), the model's own KV cache, greedy or sampled,
streamed token by token: a streamer pushes each new token id from generate's thread to the event
loop, which decodes the text incrementally and sends it as an SSE chunk. POST /v1/completions
(prompt string or token ids, max_tokens, temperature, top_p, seed, stream, stream_options.
include_usage, ignore_eos), GET /v1/models, GET /health. Prints `READY HOST:PORT` when listening.

    python -m bench.serving.baseline_server --model DIR --port 8100 [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class QueueStreamer(BaseStreamer):
    """generate() calls put() from its thread: first the prompt, then each new token."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


@dataclass
class Baseline:
    model: Any
    tokenizer: Any
    name: str
    lock: asyncio.Lock

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body.get("prompt", "")
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        stream, rid, created = bool(body.get("stream")), f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage_wanted = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"}) if stream else None

        def chunk(text: str | None, finish: str | None, usage: dict[str, int] | None = None) -> bytes:
            choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish}]
            event = {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                     "choices": choices}  # fmt: skip
            if usage_wanted:
                event["usage"] = usage
            return f"data: {json.dumps(event)}\n\n".encode()

        async with self.lock:  # the simple way: one generate at a time
            if "seed" in body:
                torch.manual_seed(int(body["seed"]))
            if response is not None:
                await response.prepare(request)
            streamer = QueueStreamer(asyncio.get_running_loop(), queue)
            inputs = torch.tensor([ids])

            def work() -> None:
                with torch.inference_mode():
                    self.model.generate(inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                                        pad_token_id=self.tokenizer.eos_token_id, **kwargs)  # fmt: skip

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            out: list[int] = []
            sent = ""
            try:
                while (token := await queue.get()) is not None:
                    out.append(token)
                    full = self.tokenizer.decode(out, skip_special_tokens=True)
                    if response is not None and not full.endswith("\ufffd") and len(full) > len(sent):
                        await response.write(chunk(full[len(sent) :], None))
                        sent = full
            finally:  # a client that left: keep the lock until generate is done all the same
                await asyncio.to_thread(thread.join)
        eos = out and out[-1] == self.tokenizer.eos_token_id and len(out) < max_tokens
        finish = "stop" if eos else "length"
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "total_tokens": len(ids) + len(out),
        }
        if response is None:
            return web.json_response({
                "id": rid, "object": "text_completion", "created": created, "model": self.name,
                "choices": [{"index": 0, "text": self.tokenizer.decode(out, skip_special_tokens=True),
                             "finish_reason": finish}], "usage": usage,
            })  # fmt: skip
        await response.write(chunk("", finish))
        if usage_wanted:
            await response.write(chunk(None, None, usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model"}]})


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"READY {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    baseline = Baseline(
        model, AutoTokenizer.from_pretrained(args.model), Path(args.model).name, asyncio.Lock()
    )
    app = web.Application()
    app.router.add_post("/v1/completions", baseline.completions)
    app.router.add_get("/v1/models", baseline.models)
    app.router.add_get("/health", health)

    asyncio.run(serve(app, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
