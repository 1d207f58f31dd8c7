"""Serving under load: the real OpenAI-compatible server, driven by the official ``openai`` client at several
concurrency levels, from a checkpoint on disk.

Starts ``python -m inference serve`` (base + two random adapters of the 20b QLoRA recipe's shape) on a checkpoint
written by ``benchmarks/make_checkpoint.py`` (or ``--model DIR``). For each number of concurrent clients, every
client sends chat requests back to back for ``--seconds`` (after one untimed warm-up round, which also captures the
CUDA graphs), each generating ``--tokens`` tokens. Printed per level: aggregate generated tokens/s, p50/p95 request
latency (client side) and time to first token (server side, from the request reaching the engine to its first token: the
random model writes no Harmony text, so the client sees no delta before the end). The baseline in the same run is
one client (the ratio says what batching buys) and, for the adapter mix, the base alone at the same concurrency.

    python benchmarks/serve_load.py --shape 20b --work /dev/shm/serve --json benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --shape tiny --clients 1,4 --seconds 10      # CPU, the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTION = ("Summarise the history of lighthouses along the Atlantic coast, the engineering of their lenses and how "
            "keepers lived, in a few paragraphs for a general reader.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def level(client, models: list[str], clients: int, seconds: float, tokens: int, health: str) -> dict:
    """``clients`` threads sending requests back to back for ``seconds``; model ids taken in turn."""
    latencies, generated, errors = [], [], []
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()

    def run(i: int) -> None:
        j = 0
        while time.perf_counter() < stop_at:
            model = models[(i + j) % len(models)]
            j += 1
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                       max_tokens=tokens, temperature=0)
            except Exception as exc:   # noqa: BLE001 - counted and reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                generated.append(reply.usage.completion_tokens)

    before = get(health)
    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stats = get(health)
    # the engine's own account of the level: its time in prefill forwards and in decode steps (the rest is the
    # worker waiting, the HTTP layer and host work between steps), and the rows per decode step
    work = {k: round(stats[k] - before[k], 3) for k in ("prefill_seconds", "prefills", "prefill_tokens",
                                                        "decode_seconds", "decode_steps")}
    if work.get("decode_steps"):
        work["decode_ms_per_step"] = round(1000 * work["decode_seconds"] / work["decode_steps"], 2)
        # generated tokens include each request's first, which its prefill chose: an upper bound on rows a step
        work["tokens_per_decode_step"] = round((stats["generated_tokens"] - before["generated_tokens"])
                                               / work["decode_steps"], 1)
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {"clients": clients, "models": models, "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "generated_tokens": sum(generated), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(generated) / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p95_s": round(q[18], 3), "ttft_p50_s": stats.get("ttft_p50_s"),
            "ttft_p95_s": stats.get("ttft_p95_s"), "engine": work}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("20b", "120b", "tiny"), default="20b")
    ap.add_argument("--work", type=Path, help="scratch directory for the checkpoint and adapters")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of writing one")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--mixed", default="16,64", help="levels also run with base + two adapters in turn")
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import export_scale
    import openai
    import torch
    from make_checkpoint import write
    work = args.work or Path("/tmp/serve_load")
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"shape": args.shape, "tokens_per_request": args.tokens, "seconds_per_level": args.seconds,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    model_dir = args.model
    if model_dir is None and args.shape == "tiny":
        from inference.model.tiny import resolve_model
        model_dir = resolve_model("tiny-gpt-oss")
    if model_dir is None:
        model_dir = work / f"gpt-oss-{args.shape}"
        t = time.perf_counter()
        if not (model_dir / "config.json").exists():
            write(args.shape, model_dir, 5 * 2**30, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        report["checkpoint_s"] = round(time.perf_counter() - t, 1)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        export_scale.write_adapter(model_dir, work / name, seed=seed)
        adapters[name] = str(work / name)
    port = free_port()
    cmd = [sys.executable, "-m", "inference", "serve", "--model", str(model_dir), "--name", "base", "--port", str(port),
           "--max-tokens-cap", str(args.tokens)] + [x for n, p in adapters.items() for x in ("--adapter", f"{n}={p}")]
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=repo, env=env)
    health = f"http://127.0.0.1:{port}/health"
    try:
        while True:
            try:
                get(health)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode}")
                time.sleep(0.5)
        report["server_start_s"] = round(time.perf_counter() - t, 1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        levels = [int(c) for c in args.clients.split(",")]
        mixed = [int(c) for c in args.mixed.split(",") if c]
        report["levels"] = []
        for clients in levels:
            for models in [["base"]] + ([["base", "a", "b"]] if clients in mixed else []):
                level(client, models, clients, min(3.0, args.seconds), args.tokens, health)   # warm-up, untimed
                row = level(client, models, clients, args.seconds, args.tokens, health)
                report["levels"].append(row)
                print(f"{clients:3d} clients {'+'.join(models):10s} {row['tokens_per_s']:9.1f} tokens/s  "
                      f"latency p50 {row['latency_p50_s']} s p95 {row['latency_p95_s']} s  "
                      f"TTFT p50 {row['ttft_p50_s']} s p95 {row['ttft_p95_s']} s  "
                      f"({row['requests']} requests, {row['errors']} errors)", flush=True)
                work = row["engine"]
                if work.get("decode_steps"):
                    print(f"      engine: {work['decode_steps']} decode steps, {work['decode_ms_per_step']} ms each, "
                          f"{work['tokens_per_decode_step']} tokens a step; {work['prefills']} prefills "
                          f"({work['prefill_tokens']} tokens) took {work['prefill_seconds']} s; decode "
                          f"{work['decode_seconds']} s of {row['wall_s']} s", flush=True)
        base = {r["clients"]: r for r in report["levels"] if r["models"] == ["base"]}
        one = base.get(1, {}).get("tokens_per_s")
        for r in report["levels"]:
            if one and r["models"] == ["base"]:
                r["vs_1_client"] = round(r["tokens_per_s"] / one, 2)
            if r["models"] != ["base"] and r["clients"] in base:
                r["vs_base_alone"] = round(r["tokens_per_s"] / base[r["clients"]]["tokens_per_s"], 3)
        for r in report["levels"]:
            print(f"{r['clients']:3d} clients {'+'.join(r['models']):10s} ratio vs 1 client "
                  f"{r.get('vs_1_client', '-')}  vs base alone {r.get('vs_base_alone', '-')}")
        report["health"] = get(health)
    finally:
        server.terminate()
        server.wait(60)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
