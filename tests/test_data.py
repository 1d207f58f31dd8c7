"""finetune.data.prepare: the eval split, the over-long policy with its counts, per-example reasoning effort, stats."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from finetune.data.formats import DataError
from finetune.data.prepare import prepare, preview
from finetune.recipe import load_recipe
from inference import harmony


def recipe(tmp_path, *overrides):
    return load_recipe(REPO / "recipes/tiny-cpu.yaml",
                       [f"data.train={REPO / 'data/tiny/train.jsonl'}", "data.eval=null", *overrides])


def test_truncate_keeps_examples_and_counts_them(tmp_path):
    full = prepare(recipe(tmp_path))
    longest = max(len(t.ids) for t in full.train)
    limit = longest - 3
    cut = prepare(recipe(tmp_path, f"data.max_length={limit}", "data.overlong=truncate"))
    n_long = sum(len(t.ids) > limit for t in full.train)
    assert n_long > 0 and cut.stats["truncated"] == n_long and cut.stats["dropped_overlong"] == 0
    assert len(cut.train) == len(full.train) and max(len(t.ids) for t in cut.train) == limit
    for a, b in zip(full.train, cut.train):
        assert b.ids == a.ids[:limit] and b.weights == a.weights[:limit]


def test_drop_counts_and_keeps_the_rest(tmp_path):
    full = prepare(recipe(tmp_path))
    limit = sorted(len(t.ids) for t in full.train)[len(full.train) // 2]
    dropped = prepare(recipe(tmp_path, f"data.max_length={limit}"))
    n_long = sum(len(t.ids) > limit for t in full.train)
    assert dropped.stats["dropped_overlong"] == n_long > 0
    assert len(dropped.train) == len(full.train) - n_long
    assert all(len(t.ids) <= limit for t in dropped.train)


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path):
    a = prepare(recipe(tmp_path, "data.eval_fraction=0.25"))
    b = prepare(recipe(tmp_path, "data.eval_fraction=0.25"))
    c = prepare(recipe(tmp_path, "data.eval_fraction=0.25", "train.seed=7"))
    assert len(a.eval) == 24 and len(a.train) == 72
    assert [t.source for t in a.eval] == [t.source for t in b.eval]
    assert [t.source for t in a.eval] != [t.source for t in c.eval]
    assert not {t.source for t in a.eval} & {t.source for t in a.train}
    assert len(a.eval_cases) == 24 and all(case.reference for case in a.eval_cases)


def test_stats_count_trained_tokens_per_channel(tmp_path):
    p = prepare(recipe(tmp_path))
    assert p.stats["trained_tokens"] == sum(w > 0 for t in p.train for w in t.weights)
    by_channel = p.stats["trained_tokens_by_channel"]
    assert sum(by_channel.values()) == p.stats["trained_tokens"]
    assert by_channel["final"] > 0 and by_channel["analysis"] > 0
    no_analysis = prepare(recipe(tmp_path, "harmony.loss_weights.analysis=0"))
    assert no_analysis.stats["trained_tokens_by_channel"]["analysis"] == 0
    assert no_analysis.stats["trained_tokens"] == by_channel["final"]


def test_per_example_reasoning_effort_wins(tmp_path):
    data = tmp_path / "d.jsonl"
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(conv) + "\n" + json.dumps(conv | {"reasoning_effort": "high"}) + "\n")
    p = prepare(load_recipe(REPO / "recipes/tiny-cpu.yaml", [f"data.train={data}", "data.eval=null",
                                                             "harmony.reasoning_effort=low"]))
    texts = [harmony.encoding().decode(t.ids) for t in p.train]
    assert "Reasoning: low" in texts[0] and "Reasoning: high" in texts[1]


def test_truncation_that_leaves_nothing_to_train_drops(tmp_path):
    data = tmp_path / "d.jsonl"
    conv = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    data.write_text(json.dumps(conv) + "\n")
    with pytest.raises(DataError, match="longer than data.max_length=32"):
        prepare(load_recipe(REPO / "recipes/tiny-cpu.yaml",
                            [f"data.train={data}", "data.eval=null", "data.max_length=32", "data.overlong=truncate"]))


def test_preview_marks_exactly_the_trained_tokens(tmp_path):
    text = preview(recipe(tmp_path), n=1)
    example = text.split("── ", 1)[1]  # after the legend line
    trained = example.split("⟦", 1)[1].split("⟧", 1)[0]
    assert example.count("⟦") == 1  # one contiguous trained span: analysis + final of the single turn
    first = json.loads((REPO / "data/tiny/train.jsonl").read_text().splitlines()[0])["messages"][1]
    assert trained.startswith("<|channel|>analysis<|message|>" + first["thinking"])
    assert trained.endswith("<|channel|>final<|message|>" + first["content"] + "<|return|>")
