"""Datasets -> Harmony tokens with per-token loss weights, as the recipe asks.

Loading and validating the formats is :mod:`finetune.data.formats`; rendering is :mod:`inference.harmony`. This module
joins them: the eval split, the over-long policy (drop or truncate, with counts), examples without trainable tokens
(an error naming the record), per-channel token counts, and the preview that shows what is trained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from finetune.data import packing
from finetune.data.formats import DataError, Example, dataset_fingerprint, load_examples
from finetune.recipe import Recipe, resolve_path
from inference import harmony
from inference.evaluate import Case, make_cases


@dataclass
class Tokenized:
    """One training sequence: ids, what is trained at each position (targets), the weight of predicting it, and
    where it came from (a conversation with several assistant turns may give several sequences)."""

    ids: list[int]
    weights: list[float]
    source: str
    rendered: harmony.Rendered

    @property
    def targets(self) -> list[int]:
        return self.rendered.targets[:len(self.ids)]


@dataclass
class PreparedData:
    train: list[Tokenized]
    eval: list[Tokenized]
    eval_cases: list[Case]
    stats: dict = field(default_factory=dict)


def harmony_options(recipe: Recipe, example: Example | None = None) -> harmony.HarmonyOptions:
    """The Harmony rendering options for one example: the recipe's, with the example's own reasoning effort (it wins)
    and the built-in tools it declares."""
    options = harmony.HarmonyOptions.from_settings(recipe.harmony.model_dump())
    if example and example.reasoning_effort:
        options = replace(options, reasoning_effort=example.reasoning_effort)
    return options.with_builtin_tools(example.builtin_tools if example else ())


def loss_weights(recipe: Recipe) -> dict[str, float]:
    return recipe.harmony.loss_weights.model_dump()


def render(recipe: Recipe, example: Example) -> list[harmony.Rendered]:
    """The training sequences of one example (see :func:`inference.harmony.render_for_training`)."""
    try:
        return harmony.render_for_training(example.messages, example.tools, harmony_options(recipe, example),
                                           loss_weights(recipe), recipe.harmony.trained_turns)
    except Exception as exc:  # openai-harmony rejects some content (e.g. reserved special tokens in text)
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{example.source}: cannot be rendered as Harmony ({exc})") from None


def _tokenize(recipe: Recipe, examples: list[Example], counts: dict) -> list[Tokenized]:
    limit, out = recipe.data.max_length, []
    for ex in examples:
        sequences = render(recipe, ex)
        if not any(w > 0 for r in sequences for w in r.weights):
            raise DataError(f"{ex.source}: no trainable tokens (check harmony.loss_weights: "
                            f"{loss_weights(recipe)})")
        for r in sequences:
            ids, weights = r.ids, r.weights
            if len(ids) > limit:
                if recipe.data.overlong == "drop" or not any(w > 0 for w in weights[:limit]):
                    counts["dropped_overlong"] += 1
                    continue
                ids, weights = ids[:limit], weights[:limit]
                counts["truncated"] += 1
            out.append(Tokenized(ids, weights, ex.source, r))
    return out


def split_eval(recipe: Recipe, train: list[Example]) -> tuple[list[Example], list[Example]]:
    """Hold out ``data.eval_fraction`` of train (seeded), when no eval file is given."""
    if recipe.data.eval or recipe.data.eval_fraction == 0:
        return train, []
    order = list(range(len(train)))
    random.Random(recipe.train.seed).shuffle(order)
    n_eval = max(1, round(len(train) * recipe.data.eval_fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def load_split(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    d = recipe.data
    train = load_examples(resolve_path(None, d.train), d.format, d.max_train_examples)
    if d.eval:
        evals = load_examples(resolve_path(None, d.eval), d.format, d.max_eval_examples)
    else:
        train, evals = split_eval(recipe, train)
        evals = evals[: d.max_eval_examples] if d.max_eval_examples else evals
    return train, evals


def prepare(recipe: Recipe) -> PreparedData:
    """Load, split, render and count everything the run needs."""
    train_ex, eval_ex = load_split(recipe)
    counts = {"dropped_overlong": 0, "truncated": 0}
    train = _tokenize(recipe, train_ex, counts)
    if not train:
        raise DataError(f"{recipe.data.train}: all {len(train_ex)} training examples are longer than "
                        f"data.max_length={recipe.data.max_length} and were dropped")
    eval_counts = {"dropped_overlong": 0, "truncated": 0}
    evals = _tokenize(recipe, eval_ex, eval_counts)
    turns = recipe.harmony.trained_turns
    cases = [c for e in eval_ex for c in make_cases(e.messages, e.tools, harmony_options(recipe, e), e.source, turns)]
    if recipe.evaluation.max_examples:
        cases = cases[: recipe.evaluation.max_examples]
    by_kind = {k: 0 for k in harmony.WEIGHT_KEYS}
    for t in train:
        for k, n in t.rendered.trained_tokens_by_kind().items():
            by_kind[k] += n
    stats = {
        "train_rows": len(train_ex), "train_examples": len(train), "trained_turns": recipe.harmony.trained_turns,
        "eval_rows": len(eval_ex), "eval_examples": len(evals),
        "dropped_overlong": counts["dropped_overlong"], "truncated": counts["truncated"],
        "eval_dropped_overlong": eval_counts["dropped_overlong"],
        "train_tokens": sum(len(t.ids) for t in train),
        "trained_tokens": sum(1 for t in train for w in t.weights if w > 0),
        "trained_tokens_by_channel": by_kind,
        "train_fingerprint": dataset_fingerprint(resolve_path(None, recipe.data.train)),
        "eval_fingerprint": dataset_fingerprint(resolve_path(None, recipe.data.eval)) if recipe.data.eval else None,
        "harmony_hash": harmony.rendering_hash(harmony_options(recipe), loss_weights(recipe),
                                               recipe.harmony.trained_turns),
    }
    if recipe.data.packing:
        rows = packing.plan([len(t.ids) for t in train], recipe.data.max_length)
        stats["packed_rows"] = len(rows)
        stats["packed_fill"] = stats["train_tokens"] / (len(rows) * recipe.data.max_length)
    return PreparedData(train, evals, cases, stats)


@dataclass
class RenderedExample:
    """One training example as text pieces: ``(text, kind)``, kind the channel key of a trained piece, else None."""

    source: str
    tokens: int
    pieces: list[tuple[str, str | None]]
    trained: dict[str, int]          # trained tokens per channel


# Highlight colours per trained channel (HTML view) and the legend order.
COLOURS = {"final": "#c8f7c5", "analysis": "#cfe3ff", "commentary": "#f3d9ff", "tool_call": "#ffe2b8"}


class Preview:
    """Rendered training examples with their trained spans: text (``str()``), HTML in a notebook, counts as a
    DataFrame (``counts``: one row per example, one column per channel)."""

    def __init__(self, examples: list[RenderedExample]):
        self.examples = examples

    @property
    def totals(self) -> dict[str, int]:
        return {k: sum(e.trained[k] for e in self.examples) for k in harmony.WEIGHT_KEYS}

    @property
    def counts(self):
        import pandas as pd
        return pd.DataFrame([{"example": e.source, "tokens": e.tokens, **e.trained} for e in self.examples])

    def text(self, color: bool = False) -> str:
        open_, close = ("\x1b[1;32m", "\x1b[0m") if color else ("⟦", "⟧")
        parts = [f"(trained tokens are shown {open_}like this{close}, as the model learns to emit them)"]
        for e in self.examples:
            # adjacent trained pieces of different channels read as one marked span in text
            body, trained = "", False
            for t, kind in e.pieces:
                body += (open_ if kind and not trained else close if trained and not kind else "") + t
                trained = bool(kind)
            body += close if trained else ""
            summary = ", ".join(f"{k} {v}" for k, v in e.trained.items())
            parts.append(f"── {e.source}: {e.tokens} tokens, trained: {summary}\n{body}\n")
        total = ", ".join(f"{k} {v}" for k, v in self.totals.items())
        parts.append(f"trained tokens per channel over {len(self.examples)} examples: {total}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        total = ", ".join(f"{k} {v}" for k, v in self.totals.items())
        return f"<Preview of {len(self.examples)} examples; trained tokens per channel: {total}>"

    def _repr_html_(self) -> str:
        from html import escape
        legend = " ".join(f'<span style="background:{c};padding:0 4px">{k}</span>' for k, c in COLOURS.items())
        out = [f"<div>trained tokens, by channel: {legend}; untrained text is plain</div>"]
        for e in self.examples:
            body = "".join(f'<span style="background:{COLOURS[kind]}" title="{kind}">{escape(t)}</span>' if kind
                           else escape(t) for t, kind in e.pieces)
            summary = ", ".join(f"{k} {v}" for k, v in e.trained.items())
            out.append(f"<p><b>{escape(e.source)}</b>: {e.tokens} tokens, trained: {summary}</p>"
                       f'<pre style="white-space:pre-wrap">{body}</pre>')
        return "\n".join(out)


def render_example(recipe: Recipe, example: Example) -> list[RenderedExample]:
    """Render one example (one entry per training sequence) and cut each into pieces at every change of
    trained/untrained or channel. Trained pieces show what the model learns to emit: an earlier answer that history
    stores with ``<|end|>`` shows its trained ``<|return|>``."""
    sequences = render(recipe, example)
    enc = harmony.encoding()
    out = []
    for n, r in enumerate(sequences, 1):
        kind_at = [None] * len(r.ids)
        for span in r.spans:
            if span.role == "assistant":
                for i in range(span.start, min(span.end, len(r.ids))):
                    kind_at[i] = span.kind
        pieces, run, current = [], [], None
        for i, (tok, target, w) in enumerate(zip(r.ids, r.targets, r.weights)):
            kind = (kind_at[i] or "final") if w > 0 else None
            if kind != current and run:
                pieces.append((enc.decode(run), current))
                run = []
            current = kind
            run.append(target if w > 0 else tok)
        if run:
            pieces.append((enc.decode(run), current))
        source = example.source if len(sequences) == 1 else f"{example.source} (sequence {n} of {len(sequences)})"
        out.append(RenderedExample(source, len(r.ids), pieces, r.trained_tokens_by_kind()))
    return out


def preview_examples(recipe: Recipe, n: int = 3) -> Preview:
    """The first ``n`` training examples, rendered, with trained spans (see :class:`Preview`)."""
    examples = load_examples(resolve_path(None, recipe.data.train), recipe.data.format, n)
    return Preview([seq for ex in examples for seq in render_example(recipe, ex)])


def preview(recipe: Recipe, n: int = 3, color: bool = False) -> str:
    """N rendered training examples with trained spans marked, then trained-token counts per channel."""
    return preview_examples(recipe, n).text(color)
