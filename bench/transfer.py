"""KV transfer bandwidth: our pair channel (``send_kv``) against a raw torch.distributed send/recv.

    python bench/transfer.py                      # 128, 512, 2048 tokens, gloo on CPU
    python bench/transfer.py --repeats 5 --out transfer.json

Two processes on this host: rank 0 plays the decode worker (TransferServer), rank 1 the prefill
worker (TransferClient). Layout: SmolLM2-135M (30 layers, 3 KV heads, head dim 64, block size 16,
float32), block-major paged caches like the engine's. Per repeat, every transport moves the same
payload bytes, in an order that alternates between repeats:

- raw: one contiguous tensor, ``dist.send``/``dist.recv`` on an ``init_process_group`` world
  (the issue's baseline);
- raw-chunked: the same tensor as one-block messages, all posted at once (``isend``/``irecv``):
  on gloo over loopback this is about twice as fast as one large message, so it is the stricter
  baseline;
- naive: what a user would write for paged KV on that world: gather every block into one
  preallocated tensor, send, receive, scatter into the reserved blocks (no header);
- ours (contiguous): ``send_kv`` with source and destination blocks that are each one run of
  consecutive ids, what the block manager hands a fresh prompt: no copy, messages of at most
  ``ChannelConfig.message_bytes`` (1 MiB: one block here); "ours-contiguous-1msg" sends the run as one message;
- ours (scattered): random source and destination blocks, no two consecutive: one message per
  block, still no copy (the worst case for fragmentation).

"ours" is timed from the ``send_kv`` call to the receiver's ``on_complete`` (end to end: hand-off
to the sender thread, epoch check, doorbell, header, segment table, payload).

Seconds are CLOCK_MONOTONIC differences between the two processes; medians over repeats. NCCL runs
when CUDA has 2 GPUs (one per process); otherwise the report says it was skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from scalellm.transfer import ChannelConfig, KVLayout, TransferClient, TransferServer

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, CACHE_BLOCKS = 30, 3, 64, 16, 320
# channel variants: name -> (block tables are one run, largest message in bytes)
VARIANTS: dict[str, tuple[bool, int]] = {
    "ours-contiguous": (True, ChannelConfig.message_bytes),
    "ours-contiguous-1msg": (True, 1 << 40),
    "ours-scattered": (False, ChannelConfig.message_bytes),
}
BASELINES = ("raw", "raw-chunked", "naive")


@dataclass(frozen=True)
class Row:
    backend: str
    tokens: int
    payload_mb: float
    transport: str
    median_s: float
    gbytes_per_s: float
    ratio_to_raw: float


def _block_table(tokens: int, seed: int, contiguous: bool) -> list[int]:
    """Block ids for ``tokens``: one run at a seed-dependent offset, or random with no two
    consecutive ids anywhere (each block its own segment)."""
    n = -(-tokens // BLOCK_SIZE)
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        start = int(torch.randint(0, CACHE_BLOCKS - n + 1, (1,), generator=gen))
        return list(range(start, start + n))
    evens = torch.randperm(CACHE_BLOCKS // 2, generator=gen)[:n] * 2  # even ids: never consecutive
    return evens.tolist()


def _worker(rank: int, port: int, backend: str, sizes: list[int], repeats: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)  # one core per worker, as the launcher would give them
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # raw gloo on loopback, like our channel
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL barriers use the current device: one GPU per rank
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
    dist.init_process_group(backend, store=dist.PrefixStore("raw", store), rank=rank, world_size=2)
    kv = torch.randn(CACHE_BLOCKS, LAYERS, 2, BLOCK_SIZE, HEADS, HEAD_DIM, device=device)
    layout = KVLayout.from_kv_cache(kv, "SmolLM2-135M")
    landed: dict[int, float] = {}
    arrived = threading.Condition()

    def on_complete(tid: int, _stats: object) -> None:
        with arrived:
            landed[tid] = time.monotonic()
            arrived.notify_all()

    def on_error(tid: int, exc: BaseException) -> None:
        print(f"transfer {tid} failed: {exc}", flush=True)
        os._exit(1)

    destinations: dict[int, list[int]] = {}  # transfer id -> reserved blocks (rank 0)
    configs = {
        name: ChannelConfig(device_host="127.0.0.1", message_bytes=size)
        for name, (_, size) in VARIANTS.items()
    }
    if rank == 0:
        server = TransferServer("decode", "127.0.0.1:0", layout, kv, lambda t, n, b: destinations[t],
                                on_complete, on_error, configs["ours-contiguous"])  # fmt: skip
        for name in VARIANTS:
            server.open(name)
        store.set("endpoint", str(server.endpoint))
    else:
        endpoint = store.get("endpoint").decode()
        clients = {name: TransferClient(name, layout, kv, configs[name]) for name in VARIANTS}

    tid, samples = 0, {}
    for tokens in sizes:
        flat = torch.empty(_payload(tokens, layout) // 4, device=device)
        src = {v: _block_table(tokens, 0, run) for v, (run, _) in VARIANTS.items()}
        dst = {v: _block_table(tokens, 1, run) for v, (run, _) in VARIANTS.items()}
        index = torch.tensor((src if rank == 1 else dst)["ours-scattered"], device=device)
        staged = kv.index_select(0, index)
        chunks = flat.split(layout.block_bytes // 4)
        for rep in range(repeats + 1):  # repeat 0 warms up and lets the channel join
            for name in [*BASELINES, *VARIANTS] if rep % 2 else [*VARIANTS, *BASELINES]:
                tid += 1
                if rank == 0 and name in VARIANTS:
                    destinations[tid] = dst[name]
                dist.barrier()
                if rank == 1:
                    store.set(f"t0/{tid}", str(time.monotonic()))
                    if name == "raw":
                        dist.send(flat, 0)
                    elif name == "raw-chunked":
                        for work in [dist.isend(c, 0) for c in chunks]:
                            work.wait()
                    elif name == "naive":
                        dist.send(torch.index_select(kv, 0, index, out=staged), 0)
                    else:
                        clients[name].send_kv("decode", endpoint, tid, src[name], dst[name], tokens)
                    continue
                if name in BASELINES:
                    if name == "raw-chunked":
                        for work in [dist.irecv(c, 1) for c in chunks]:
                            work.wait()
                    else:
                        dist.recv(flat if name == "raw" else staged, 1)
                    if name == "naive":
                        kv.index_copy_(0, index, staged)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t1 = time.monotonic()
                else:
                    with arrived:
                        if not arrived.wait_for(lambda t=tid: t in landed, timeout=300):
                            raise TimeoutError(f"transfer {tid} never landed")
                    t1 = landed[tid]
                if rep:
                    samples.setdefault((tokens, name), []).append(t1 - float(store.get(f"t0/{tid}")))
    dist.barrier()
    if rank == 0:
        out.put({key: statistics.median(v) for key, v in samples.items()})
        server.close()
    else:
        for client in clients.values():
            client.close()
    dist.destroy_process_group()


def _payload(tokens: int, layout: KVLayout) -> int:
    return -(-tokens // BLOCK_SIZE) * layout.block_bytes


def run(backend: str, sizes: list[int], repeats: int) -> list[Row]:
    """Both transports at every size, in two fresh processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [ctx.Process(target=_worker, args=(r, store.port, backend, sizes, repeats, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    while True:
        try:
            medians = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit("a benchmark worker died; see its traceback above") from None
    for p in procs:
        p.join()
    layout = KVLayout("SmolLM2-135M", "float32", LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE)
    rows = []
    for tokens in sizes:
        raw, nbytes = medians[(tokens, "raw")], _payload(tokens, layout)
        for name in [*BASELINES, *VARIANTS]:
            s = medians[(tokens, name)]
            rows.append(Row(backend, tokens, nbytes / 1e6, name, s, nbytes / s / 1e9, raw / s))
    return rows


def prefill_seconds(model: str | None, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median engine time to prefill one prompt of each size (and sample its first token)."""
    import random
    import time

    from scalellm import LLM, SamplingParams

    llm = LLM(model=model, enable_prefix_caching=False, max_num_batched_tokens=max(sizes), kv_cache_gb=1.0)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    result = {}
    for tokens in sizes:
        times = []
        for _ in range(repeats):
            prompt = [rng.randrange(100, 49000) for _ in range(tokens)]
            start = time.perf_counter()
            llm.generate({"prompt_token_ids": prompt}, params)
            times.append(time.perf_counter() - start)
        result[tokens] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--prefill-model",
        default="demo",
        help="HF folder whose prefill time to set beside (demo; none: skip)",
    )
    args = parser.parse_args()

    rows = run("gloo", args.tokens, args.repeats)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2 and dist.is_nccl_available():
        rows += run("nccl", args.tokens, args.repeats)
        nccl_note = "NCCL: measured on cuda:0 -> cuda:1"
    else:
        nccl_note = f"NCCL: skipped (needs 2 CUDA GPUs, found {gpus})"
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )

    print(f"KV transfer bandwidth, medians of {args.repeats} repeats; {machine}; {nccl_note}\n")
    print("| backend | tokens | payload MB | transport | median ms | GB/s | vs raw |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r.backend} | {r.tokens} | {r.payload_mb:.1f} | {r.transport} | {r.median_s * 1e3:.2f} "
              f"| {r.gbytes_per_s:.2f} | {r.ratio_to_raw:.0%} |")  # fmt: skip
    prefill: dict[int, float] = {}
    if args.prefill_model != "none":
        prefill = prefill_seconds(
            None if args.prefill_model == "demo" else args.prefill_model, args.tokens, 3
        )
        ours = {
            r.tokens: r.median_s for r in rows if r.backend == "gloo" and r.transport == "ours-contiguous"
        }
        print("\n| prompt tokens | prefill ms (engine) | transfer ms (ours, gloo) | transfer / prefill |")
        print("|---:|---:|---:|---:|")
        for tokens, seconds in prefill.items():
            sent = ours.get(tokens, float("nan"))
            print(f"| {tokens} | {seconds * 1e3:.1f} | {sent * 1e3:.1f} | {sent / seconds:.0%} |")
    if args.out:
        report = {
            "machine": machine,
            "nccl": nccl_note,
            "repeats": args.repeats,
            "rows": [asdict(r) for r in rows],
            "prefill_seconds": prefill,
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
