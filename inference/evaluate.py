"""Evaluation on held-out Harmony conversations: loss/perplexity and what the model actually answers.

Two measurements, one report, both on the runtime (:class:`inference.engine.Engine`), for the base model or any
loaded adapter:

- **loss**: the weighted next-token loss (:func:`inference.loss.weighted_nll`) over the rendered conversations, the
  same loss training optimises, so "before" and "after" are comparable.
- **generation**: each conversation is cut before each of its assistant turns (``turns="all"``, every turn trained)
  or only before its last one (``"last"``); the model completes each greedily from the Harmony prompt (batched,
  KV-cached); the completion is parsed into channels by openai-harmony. ``exact_match``
  compares the final-channel text with the reference (whitespace-stripped); ``final_rate`` is the share of
  completions that reach a final channel; ``stop_rate`` the share that end the turn with a stop token (``<|return|>``
  or ``<|call|>``) within the token budget; ``tool_call_json_valid`` the share of generated tool calls whose
  arguments parse as JSON.

``python -m inference eval`` (:func:`evaluate_file`) and training's before/after evaluation both call
:func:`evaluate`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from inference import harmony
from inference.engine.batch import PAD_ID, pad_rows
from inference.loss import weighted_nll


@dataclass
class Case:
    """A generation probe: the prompt tokens and the reference final answer (None if the turn has none)."""

    prompt_ids: list[int]
    reference: str | None
    source: str = ""


def make_cases(messages: list[dict], tools: list[dict] | None, options: harmony.HarmonyOptions, source: str = "",
               turns: str = "all") -> list[Case]:
    """The generation probes of a conversation: one per run of assistant messages (what the model generates in one
    go, up to ``<|return|>`` or ``<|call|>``), its prompt the conversation before it as Harmony history, its
    reference the run's last final answer (None for a run that only calls tools). ``turns="last"``: only the run that
    ends the conversation; none when the conversation does not end with an assistant message."""
    runs, start = [], None
    for i, m in enumerate(messages + [{"role": None}]):
        if m["role"] == "assistant" and start is None:
            start = i
        elif m["role"] != "assistant" and start is not None:
            runs.append((start, i))
            start = None
    if turns == "last":
        runs = runs[-1:] if runs and runs[-1][1] == len(messages) else []
    cases = []
    for start, end in runs:
        if start == 0:
            continue   # nothing before it to prompt with
        finals = [m.get("content") for m in messages[start:end] if m.get("content") and not m.get("tool_calls")]
        cases.append(Case(harmony.render_prompt(messages[:start], tools, options), finals[-1] if finals else None,
                          source))
    return cases


def pad_weighted(ids_rows: list[list[int]], weight_rows: list[list[float]], target_rows: list[list[int]]):
    """Right-padded ``(input_ids, attention_mask, loss_weights, targets)``, each ``(B, T_max)``, for the weighted
    loss."""
    return (pad_rows(ids_rows, PAD_ID), pad_rows([[1] * len(r) for r in ids_rows], 0),
            pad_rows(weight_rows, 0.0, dtype=torch.float32), pad_rows(target_rows, PAD_ID))


@torch.inference_mode()
def mean_loss(engine, examples: list[tuple[list[int], list[float], list[int]]], model: str | None = None,
              batch_size: int = 8) -> dict:
    """Weighted mean loss over ``(ids, weights, targets)`` sequences, and the matching perplexity."""
    rt, adapter = engine.model, engine.adapter_for(model)
    head_w = rt.lm_head.effective_weight(adapter)
    total, weight, tokens = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, mask, w, targets = (t.to(rt.embed.device) for t in pad_weighted(*(list(c) for c in zip(*chunk))))
        s, ws, n = weighted_nll(rt(ids, mask, adapter=adapter), head_w, rt.lm_head.bias, targets, w)
        total, weight, tokens = total + s.item(), weight + ws.item(), tokens + int(n)
    loss = total / weight if weight else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "loss_tokens": tokens}


def generate_greedy(engine, prompts: list[list[int]], max_new_tokens: int, model: str | None = None,
                    progress=None) -> list[list[int]]:
    """Greedy completions (token ids, stop token included if reached) of Harmony prompts, all generated together by
    the engine's continuous batching (``engine.max_batch`` at a time; each ends at its own stop token)."""
    return engine.generate(prompts, max_new_tokens, model,
                           on_done=None if progress is None else lambda: progress.update(1))


def evaluate(engine, loss_examples: list[tuple[list[int], list[float], list[int]]], cases: list[Case],
             max_new_tokens: int, model: str | None = None, samples: int = 5, progress=None) -> dict:
    """The evaluation report (a JSON-able dict) for ``model`` (base id or adapter name) on held-out data."""
    report = mean_loss(engine, loss_examples, model) if loss_examples else {}
    completions = generate_greedy(engine, [c.prompt_ids for c in cases], max_new_tokens, model,
                                  progress=progress) if cases else []
    replies = [harmony.parse_completion(toks) for toks in completions]
    scored = [(c, r) for c, r in zip(cases, replies) if c.reference is not None]
    calls = [call for r in replies for call in r.tool_calls]
    report |= {
        "examples": len(loss_examples),
        "generated": len(cases),
        "exact_match": (sum((r.final or "").strip() == c.reference.strip() for c, r in scored) / len(scored)
                        if scored else None),
        "final_rate": sum(r.final is not None for r in replies) / len(replies) if replies else None,
        # a turn ends at <|return|> (answer) or <|call|> (tool call); <|end|> after an answer is the history form,
        # and a model that emits it keeps generating until the token budget runs out
        "stop_rate": sum(r.complete for r in replies) / len(replies) if replies else None,
        "tool_call_json_valid": sum(_is_json(c["arguments"]) for c in calls) / len(calls) if calls else None,
        "samples": [{"source": c.source, "reference": c.reference, "final": r.final, "analysis": r.analysis}
                    for c, r in list(zip(cases, replies))[:samples]],
    }
    return report


def evaluate_file(engine, path: str | Path, model: str | None = None, max_new_tokens: int = 256,
                  reasoning_effort: str = "medium", loss_weights: dict[str, float] | None = None,
                  limit: int | None = None, samples: int = 5, progress=None, turns: str = "all") -> dict:
    """Evaluate on a JSON-lines conversation file (OpenAI chat or ShareGPT records, as training reads them).

    Loss weights default to the final channel only; conversations longer than the context window are left out of
    the loss and counted as ``skipped_overlong``. An example's own ``reasoning_effort`` wins over the argument.
    ``turns``: which assistant turns the loss covers (``all`` or ``last``, as training's ``harmony.trained_turns``).
    """
    from inference.conversations import load_jsonl_examples
    examples = load_jsonl_examples(path, limit=limit)
    report = evaluate_examples(engine, examples, model, max_new_tokens, reasoning_effort, loss_weights, samples,
                               progress, turns)
    return {"data": str(path), **report}


def evaluate_examples(engine, examples: list, model: str | None = None, max_new_tokens: int = 256,
                      reasoning_effort: str = "medium", loss_weights: dict[str, float] | None = None,
                      samples: int = 5, progress=None, turns: str = "all",
                      options: harmony.HarmonyOptions | None = None, max_cases: int | None = None) -> dict:
    """:func:`evaluate_file` on conversations already read (``inference.conversations.Example``). ``options``: the
    Harmony rendering (a run's, see :func:`run_settings`; its effort replaces ``reasoning_effort``), a
    conversation's own effort still winning; ``max_cases`` caps the generations (the recipe's
    ``evaluation.max_examples``)."""
    weights = loss_weights or {"final": 1.0}
    base = options or harmony.HarmonyOptions(reasoning_effort=reasoning_effort)
    loss_examples, cases, skipped = [], [], 0
    for ex in examples:
        options = replace(base, reasoning_effort=ex.reasoning_effort or base.reasoning_effort)
        options = options.with_builtin_tools(ex.builtin_tools)
        for rendered in harmony.render_for_training(ex.messages, ex.tools, options, weights, turns):
            if len(rendered.ids) > engine.context_length:
                skipped += 1
            elif any(w > 0 for w in rendered.weights):
                loss_examples.append((rendered.ids, rendered.weights, rendered.targets))
        cases += make_cases(ex.messages, ex.tools, options, ex.source, turns)
    cases = cases[:max_cases] if max_cases else cases
    if progress is not None:
        progress.reset(total=len(cases))
    report = evaluate(engine, loss_examples, cases, max_new_tokens, model, samples, progress)
    return {"model": model or engine.base_id, "max_new_tokens": max_new_tokens,
            "reasoning_effort": base.reasoning_effort, "loss_weights": weights, "trained_turns": turns,
            "skipped_overlong": skipped, **report}


@dataclass
class RunSettings:
    """What ``python -m inference eval --run RUN_DIR`` takes from a fine-tuning run, so that it evaluates as the
    run's own end-of-run evaluation did."""

    model: str                    # the base model directory (run.json) or the recipe's model name
    adapter: str                  # RUN_DIR/adapter
    data: str | None              # the recipe's data.eval (None: the run split its held-out set from data.train)
    options: harmony.HarmonyOptions
    loss_weights: dict[str, float]
    turns: str
    max_new_tokens: int
    max_cases: int | None


def run_settings(run_dir: str | Path) -> RunSettings:
    """Read a run directory's ``recipe.yaml`` (the resolved recipe) and ``run.json``: one clear error when the
    directory is not a finished run. Paths in the recipe are taken from the current directory, as the run did."""
    import yaml

    from inference.errors import UserError
    run_dir = Path(run_dir)
    recipe_file, adapter = run_dir / "recipe.yaml", run_dir / "adapter"
    if not recipe_file.is_file():
        raise UserError(f"--run {run_dir}: no recipe.yaml there; give the directory a `python -m finetune run` wrote")
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--run {run_dir}: no final adapter ({adapter}/adapter_config.json); did the run finish?")
    try:
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8")) if (run_dir / "run.json").is_file() \
            else {}
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"--run {run_dir}: cannot read the run's records ({type(exc).__name__}: {exc})") from None
    h, ev = recipe.get("harmony") or {}, recipe.get("evaluation") or {}
    model = info.get("model_dir") if info.get("model_dir") and Path(info["model_dir"]).is_dir() else \
        (recipe.get("model") or {}).get("name_or_path")
    if not model:
        raise UserError(f"--run {run_dir}: the base model is recorded neither in run.json nor in recipe.yaml")
    # recipe.yaml is the resolved recipe, every key written out: a missing one is not guessed
    for section, key in (("harmony", "loss_weights"), ("harmony", "trained_turns"), ("harmony", "reasoning_effort"),
                         ("evaluation", "max_new_tokens"), ("evaluation", "max_examples")):
        if key not in (h if section == "harmony" else ev):
            raise UserError(f"--run {run_dir}: recipe.yaml has no {section}.{key}; evaluate with --model, --adapter "
                            "and --data instead")
    return RunSettings(model=str(model), adapter=str(adapter), data=(recipe.get("data") or {}).get("eval"),
                       options=harmony.HarmonyOptions.from_settings(h), loss_weights=h["loss_weights"],
                       turns=h["trained_turns"], max_new_tokens=ev["max_new_tokens"], max_cases=ev["max_examples"])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
