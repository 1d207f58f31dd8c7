"""``python -m inference``: chat in the terminal, serve an OpenAI-compatible API, or evaluate on held-out data.

Every command loads the model once through :class:`inference.engine.Engine` (MXFP4 experts kept packed) with
optional PEFT adapters. Bad input (a missing model, an adapter for another base, a malformed dataset) ends the
command with one ``error: ...`` line and exit status 2. Nothing is downloaded: the hub is used offline only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from inference.errors import UserError, run_command
from inference.files import write_json
from inference.harmony import REASONING_EFFORTS as EFFORTS

DTYPES = ("auto", "float32", "bfloat16", "float16")
API_KEY_ENV = "GPT_OSS_WORKBENCH_API_KEY"   # serve's key, kept out of the command line (and so out of ps)
DEFAULT_MAX_WAIT_S = 300.0   # inference.serve.server's defaults (why: there), here so that --help needs no torch import
DEFAULT_DRAIN_S = 30.0


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="HF-layout gpt-oss directory, 'tiny-gpt-oss', or a hub id already in the local cache")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="non-expert weights (default: bfloat16 on CUDA, float32 on CPU); experts stay MXFP4")


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    p.add_argument("--reasoning-effort", choices=EFFORTS, default="medium")
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--seed", type=int, default=None)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m inference",
                                 description="Run gpt-oss (MXFP4 experts kept packed) with LoRA adapters.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat in the terminal; the reasoning (analysis channel) is shown apart")
    _model_args(p)
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory to apply")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights at load")
    p.add_argument("--system", default=None, help="instructions for the model (a developer message)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the analysis channel")
    _sampling_args(p, temperature=1.0, max_tokens=1024)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (/v1/chat/completions, /v1/models)")
    _model_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter served as model id NAME (repeatable)")
    p.add_argument("--merge", action="store_true", help="merge the single adapter into the weights at load")
    p.add_argument("--name", default=None, help="model id of the base model (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help="require 'Authorization: Bearer KEY' on every route (default: $GPT_OSS_WORKBENCH_API_KEY); "
                        "required for any host but 127.0.0.1/localhost")
    p.add_argument("--max-tokens-cap", type=int, default=4096,
                   help="the most tokens one request may generate; a larger max_tokens is capped and the reply "
                        "says so (X-Max-Tokens-Capped)")
    p.add_argument("--context-length", type=int, default=None, help="cap the context window (saves KV memory)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    # --max-batch: the flag's earlier name, still documented and still working
    _batch_args(p, "--max-concurrent", "requests generated at once (default: 64 on CUDA, 8 on CPU); the others wait "
                "for a slot", aliases=("--max-batch",), metavar="N")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a free slot; beyond it a request gets 429 with Retry-After "
                        "(default 256)")
    p.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT_S, metavar="SECONDS",
                   help="a request still waiting for a slot after this long gets 503 with Retry-After (default "
                        f"{DEFAULT_MAX_WAIT_S:g}: under the openai client's 600 s timeout, so it sees why)")
    p.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_S, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, refuse new connections and let the requests in flight finish for "
                        f"this long at most; a second signal stops at once (default {DEFAULT_DRAIN_S:g})")
    p.add_argument("--verbose", action="store_true", help="log one line per request to stderr")

    p = sub.add_parser("eval", help="evaluate on a held-out JSONL conversation dataset; writes a JSON report")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a fine-tuning run directory: its base model, adapter, held-out data, Harmony rendering, "
                        "loss weights, trained turns and generation budget, as its own evaluation used them (any "
                        "option given here wins)")
    _model_args(p, required=False)
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory to evaluate")
    p.add_argument("--data", default=None, help="JSON-lines conversations (OpenAI chat or ShareGPT records)")
    p.add_argument("--out", default="eval_report.json", help="where to write the report (default eval_report.json)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (with --run: the run's)")
    _batch_args(p, "--batch-size", "answers generated together (default: 64 on CUDA, 8 on CPU; KV memory "
                "permitting, the rest wait their turn)")
    p.add_argument("--reasoning-effort", choices=EFFORTS, default=None,
                   help="for conversations that do not set their own (default medium; with --run: the run's)")
    p.add_argument("--loss-weights", default=None,
                   help="channels whose tokens the loss counts, e.g. final=1,analysis=1 (default final=1; with "
                        "--run: the run's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N conversations")
    p.add_argument("--turns", choices=("all", "last"), default=None,
                   help="assistant turns scored (loss and generation): all, or each conversation's last; as the "
                        "recipe's harmony.trained_turns (default all; with --run: the run's)")
    return ap


def _dtype(name: str):
    import torch
    return None if name == "auto" else getattr(torch, name)


def _weights(text: str) -> dict[str, float]:
    from inference.harmony import WEIGHT_KEYS
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in WEIGHT_KEYS:
            raise UserError(f"--loss-weights: {item!r} is not CHANNEL=WEIGHT, CHANNEL one of {', '.join(WEIGHT_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise UserError(f"--loss-weights: {value!r} is not a number") from None
    if not any(v > 0 for v in out.values()):
        raise UserError("--loss-weights: at least one channel needs a positive weight")
    return out


def _adapters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {item!r}: expected NAME=DIR")
        if name in out:
            raise UserError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


def _batch_args(p, flag: str, help: str, aliases: tuple[str, ...] = (), metavar: str | None = None) -> None:
    p.add_argument(flag, *aliases, dest="max_batch", type=int, default=None, metavar=metavar, help=help)
    p.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                   help="GiB of KV cache for all sequences together (default: half the GPU memory free after "
                        "loading, 1 GiB on CPU)")


def _limits(args) -> dict:
    """The engine's batching limits from the command line (only those given; the engine checks their values)."""
    out = {}
    if getattr(args, "max_batch", None) is not None:
        out["max_batch"] = args.max_batch
    if getattr(args, "max_queue", None) is not None:
        out["max_queue"] = args.max_queue
    if getattr(args, "kv_memory", None) is not None:
        if not args.kv_memory > 0:
            raise UserError(f"--kv-memory must be a positive number of GiB, got {args.kv_memory}")
        out["kv_memory"] = int(args.kv_memory * 2**30)
    return out


def _load(args, adapters: dict[str, str] | None, name: str | None = None, context_length: int | None = None):
    from inference.engine import Engine
    limits = _limits(args)
    print(f"loading {args.model}" + (f" with adapters {', '.join(adapters)}" if adapters else "") + " ...",
          file=sys.stderr)
    return Engine.load(args.model, adapters, merge=getattr(args, "merge", False),
                       dtype=_dtype(args.dtype), device=args.device, name=name, context_length=context_length,
                       **limits)


def chat(args) -> None:
    """A read-eval-print loop; ``/reset`` forgets the conversation, ``/effort LEVEL`` changes reasoning effort."""
    from inference import harmony
    from inference.engine import Completion, SamplingParams
    engine = _load(args, {"adapter": args.adapter} if args.adapter else None)
    model = engine.model_ids[-1]              # the adapter when there is one (or the merged model)
    tty = sys.stdout.isatty()
    dim, bold, reset = ("\x1b[2m", "\x1b[1m", "\x1b[0m") if tty else ("", "", "")
    effort = args.reasoning_effort
    history: list[dict] = [{"role": "developer", "content": args.system}] if args.system else []
    print(f"chatting with {model} (reasoning effort {effort}); /reset, /effort low|medium|high, /quit",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/effort"):
            level = text.removeprefix("/effort").strip()
            if level not in EFFORTS:
                print(f"(effort must be one of {', '.join(EFFORTS)})", file=sys.stderr)
            else:
                effort = level
                print(f"(reasoning effort {effort})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.seed)
        try:
            events = engine.stream(engine.encode_chat(history, reasoning_effort=effort), params, model)
        except UserError as exc:   # e.g. the conversation outgrew the context window: say so, keep chatting
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        section, shown = None, False
        for ev in events:
            if isinstance(ev, Completion):
                done = ev
                continue
            shown = True
            if ev.kind == "reasoning" and args.hide_reasoning:
                continue
            label = {"reasoning": f"{dim}thinking: ", "content": f"{reset}{bold}assistant:{reset} ",
                     "tool_call": f"{reset}tool call: "}[ev.kind]
            if ev.kind != section:
                print(("\n" if section else "") + label, end="")
                section = ev.kind
            print((f"{ev.name} " if ev.name else "") + ev.text, end="", flush=True)
        if done.token_ids and (not done.parsed or not shown):
            # not Harmony (an untrained or broken model): what it wrote is all the user can look at
            why = "is not valid Harmony" if not done.parsed else "has no Harmony channel"
            print(("\n" if section else "") + f"{reset}(the reply {why}; its raw text:){reset}\n"
                  + harmony.encoding().decode(done.token_ids), end="")
        print(reset + ("" if done.finish_reason != "length" else "\n(cut off: max tokens reached)"))
        if done.content or done.reasoning:   # a reply with nothing in it would make the next prompt invalid
            history.append({"role": "assistant", "content": done.content or "", "thinking": done.reasoning})


def evaluate(args) -> None:
    from dataclasses import replace

    from tqdm.auto import tqdm

    from inference.conversations import load_jsonl_examples
    from inference.evaluate import evaluate_examples, run_settings
    run = run_settings(args.run) if args.run else None
    if run is None and not args.model:
        raise UserError("eval needs --model (or --run RUN_DIR, which names the run's base model)")
    if run is None and not args.data:
        raise UserError("eval needs --data (or --run RUN_DIR, whose recipe names its held-out data)")
    if run is not None and not args.data and not run.data:
        raise UserError(f"--run {args.run}: the run split its held-out set from data.train (data.eval is null); "
                        "pass --data")
    args.model, args.adapter = args.model or (run and run.model), args.adapter or (run and run.adapter)
    args.data = args.data or run.data
    weights = _weights(args.loss_weights) if args.loss_weights else (run.loss_weights if run else {"final": 1.0})
    turns = args.turns or (run.turns if run else "all")
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (run.max_new_tokens if run else 256)
    effort = args.reasoning_effort or (run.options.reasoning_effort if run else "medium")
    options = replace(run.options, reasoning_effort=effort) if run else None
    max_cases = run.max_cases if run and args.limit is None else None
    if run is not None:
        print(f"evaluating run {args.run}: model {args.model}, adapter {args.adapter}, data {args.data}, reasoning "
              f"effort {effort}, loss weights {','.join(f'{k}={v:g}' for k, v in weights.items())}, turns {turns}, "
              f"{max_new} new tokens" + (f", at most {max_cases} generations" if max_cases else ""), file=sys.stderr)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")
    examples = load_jsonl_examples(args.data, limit=args.limit)   # bad data fails before the model loads
    engine = _load(args, {"adapter": args.adapter} if args.adapter else None)
    model = engine.model_ids[-1]
    with tqdm(total=len(examples), desc="evaluating", unit="conv", file=sys.stderr) as bar:
        report = evaluate_examples(engine, examples, model, max_new, effort, weights, progress=bar, turns=turns,
                                   options=options, max_cases=max_cases)
    report = {"data": args.data, "adapter": args.adapter, **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{report['examples']} sequences scored for loss, {report['generated']} answers generated ({model})\n"
          f"  loss {report.get('loss', float('nan')):.4f}   perplexity {report.get('perplexity', float('nan')):.2f}\n"
          f"  exact match {pct(report['exact_match'])}   reached final {pct(report['final_rate'])}   "
          f"stopped {pct(report['stop_rate'])}   "
          f"tool-call JSON valid {pct(report['tool_call_json_valid'])}\n"
          f"report: {out}")


def serve(args) -> None:
    from inference.serve.server import check_host, check_limits, check_port
    from inference.serve.server import serve as run_server
    adapters = _adapters(args.adapter)
    if args.merge and len(adapters) != 1:
        raise UserError("--merge needs exactly one --adapter")
    check_host(args.host, args.api_key)   # before the model loads
    check_port(args.host, args.port)
    check_limits(args.max_tokens_cap, args.max_body_bytes, args.max_wait, args.drain_seconds, args.max_batch,
                 args.max_queue)
    if args.api_key and args.api_key != os.environ.get(API_KEY_ENV):   # given as --api-key, not from the environment
        print("note: --api-key on the command line is visible to every user of this machine (ps); set "
              f"{API_KEY_ENV} instead", file=sys.stderr)
    engine = _load(args, adapters, args.name, args.context_length)
    run_server(engine, args.host, args.port, args.api_key, max_body_bytes=args.max_body_bytes,
               max_tokens_cap=args.max_tokens_cap, verbose=args.verbose, max_wait=args.max_wait,
               drain_seconds=args.drain_seconds)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    action = {"chat": chat, "eval": evaluate, "serve": serve}[args.command]
    return run_command(lambda: action(args))
