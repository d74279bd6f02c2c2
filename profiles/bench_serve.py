"""Load test of ``offload serve``: concurrent clients against one server, in one run.

Starts ``offload serve`` on 127.0.0.1 in a subprocess, then:
1. **sequential**: every request of the load, one at a time (the baseline);
2. **concurrent**: ``--clients`` threads each sending ``--requests`` streamed requests of mixed
   prompt lengths, token counts and sampling settings (a third sampled with a seed, the rest greedy);
   every greedy result must equal the sequential one (the same text offline ``LLM.generate`` gives);
3. **memory**: ``--soak`` short requests, the server's resident memory (``/metrics``) before and after.

Reports generated tokens/s of both phases and their ratio, p50/p99 time to first token and per-token
latency (streamed chunks), errors, and the RSS growth. Writes JSON.

    python -m offload.profiles.bench_serve --clients 8 --requests 10 --soak 500 --out serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from offload.fileio import write_json_atomic

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "Write a short poem about the moon.", "def fibonacci(n):", "The best way to learn a language is",
           "Water boils at", "In 1492, Columbus sailed", "My favourite food is",
           "Explain in one sentence why the sky is blue.", "The three primary colors are"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, port: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "offload", "serve", "--port", str(port), "--max-context", str(args.max_context),
           "--max-rows", str(args.clients), "--max-queue", str(4 * args.clients), "--dtype", args.dtype, "-q"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"offload serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("offload serve did not come up in 5 minutes")


def _load(clients: int, requests: int) -> list[dict]:
    """clients x requests jobs: mixed prompts and lengths; every third sampled (seeded)."""
    jobs = []
    for c in range(clients):
        for r in range(requests):
            i = c * requests + r
            job = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8 + 8 * (i % 5), "temperature": 0.0}
            if i % 3 == 2:
                job |= {"temperature": 0.8, "top_p": 0.9, "seed": i}
            jobs.append(job)
    return jobs


def _stream(client, model: str, job: dict) -> dict:
    """One streamed completion: its text, chunk times, time to first token."""
    t0 = time.perf_counter()
    stamps, pieces, tokens = [], [], 0
    for chunk in client.completions.create(model=model, stream=True, stream_options={"include_usage": True}, **job):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"text": "".join(pieces), "ttft": (stamps[0] - t0) if stamps else None, "tokens": tokens,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "seconds": time.perf_counter() - t0}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)  # nearest rank
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _rss(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return int(float(re.search(r"^offload_process_resident_bytes (\S+)$", text, re.M).group(1)))


def main(argv=None) -> int:
    from openai import OpenAI

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--soak", type=int, default=500, help="short requests for the memory check (0: skip)")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="serve.json")
    args = p.parse_args(argv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(args, port)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        jobs = _load(args.clients, args.requests)
        _stream(client, model, jobs[0])  # warm-up (first-call compiles and allocations)

        t0 = time.perf_counter()
        sequential = [_stream(client, model, job) for job in jobs]
        sequential_s = time.perf_counter() - t0

        results: list[dict | Exception | None] = [None] * len(jobs)

        def worker(c: int) -> None:
            for r in range(args.requests):
                i = c * args.requests + r
                try:
                    results[i] = _stream(client, model, jobs[i])
                except Exception as e:  # noqa: BLE001 - counted as an error
                    results[i] = e

        threads = [threading.Thread(target=worker, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - t0

        errors = [str(r) for r in results if isinstance(r, Exception)]
        ok = [r for r in results if isinstance(r, dict)]
        mismatched = [i for i, (job, r) in enumerate(zip(jobs, results))
                      if job["temperature"] == 0 and isinstance(r, dict) and r["text"] != sequential[i]["text"]]
        generated = sum(r["tokens"] for r in ok)
        seq_generated = sum(r["tokens"] for r in sequential)

        rss_before = _rss(url)
        for i in range(args.soak):
            client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=4, temperature=0)
        rss_after = _rss(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    gaps = [g for r in ok for g in r["gaps"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    report = {
        "machine": f"{os.cpu_count()} CPUs", "model": model, "dtype": args.dtype, "clients": args.clients,
        "requests": len(jobs), "errors": errors, "greedy_mismatches": mismatched,
        "sequential": {"seconds": sequential_s, "tokens": seq_generated, "tokens_per_s": seq_generated / sequential_s,
                       "ttft_p50_ms": 1e3 * statistics.median([r["ttft"] for r in sequential if r["ttft"]])},
        "concurrent": {"seconds": concurrent_s, "tokens": generated, "tokens_per_s": generated / concurrent_s,
                       "ttft_p50_ms": 1e3 * _pct(ttfts, 0.5), "ttft_p99_ms": 1e3 * _pct(ttfts, 0.99),
                       "token_gap_p50_ms": 1e3 * _pct(gaps, 0.5), "token_gap_p99_ms": 1e3 * _pct(gaps, 0.99)},
        "speedup": sequential_s / concurrent_s,
        "soak": {"requests": args.soak, "rss_before_mib": rss_before / 2**20, "rss_after_mib": rss_after / 2**20},
    }
    write_json_atomic(Path(args.out), report)
    c, s = report["concurrent"], report["sequential"]
    print(f"| {args.clients} clients x {args.requests} | errors {len(errors)} | greedy mismatches {len(mismatched)} |")
    print(f"| one at a time | {s['seconds']:.1f} s | {s['tokens_per_s']:.1f} tok/s | TTFT p50 {s['ttft_p50_ms']:.0f} ms |")
    print(f"| {args.clients} concurrent | {c['seconds']:.1f} s | {c['tokens_per_s']:.1f} tok/s ({report['speedup']:.2f}x) | "
          f"TTFT p50 {c['ttft_p50_ms']:.0f} / p99 {c['ttft_p99_ms']:.0f} ms | per token p50 {c['token_gap_p50_ms']:.0f} / "
          f"p99 {c['token_gap_p99_ms']:.0f} ms |")
    print(f"| soak {args.soak} requests | RSS {report['soak']['rss_before_mib']:.0f} -> "
          f"{report['soak']['rss_after_mib']:.0f} MiB |")
    print(json.dumps({"out": args.out}))
    return 0 if not errors and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
