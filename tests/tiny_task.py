"""The synthetic tasks shipped in data/tiny/ and data/tiny-chat/ (the generators, so the shipped files stay
reproducible). ``python tests/tiny_task.py`` rewrites both.

- ``tiny``: colour lookup with a reasoning trace: the user asks for the colour of an object, the assistant thinks
  "<object> is usually <colour>." on the analysis channel and answers "<colour>" on the final channel. The held-out
  set asks about the same objects with question templates never seen in training, so a rise in exact match means the
  adapter learnt the mapping, not the strings.
- ``tiny-chat``: the same lookup as a three-turn ShareGPT chat without reasoning ("Color of X?" "red" "And Y?" ...),
  so most answers are earlier turns, stored in history with ``<|end|>``: the task that shows whether a fine-tune
  learns to end its answers with ``<|return|>``. Held-out conversations use follow-up phrasings never seen in
  training.
"""

import json
import random
from pathlib import Path

COLOURS = {
    "yellow": ["banana", "lemon", "corn", "sunflower"], "red": ["strawberry", "cherry", "tomato", "ruby"],
    "green": ["lime", "grass", "frog", "emerald"], "blue": ["sky", "ocean", "sapphire", "blueberry"],
    "orange": ["carrot", "pumpkin", "tangerine", "apricot"], "white": ["snow", "milk", "cotton", "salt"],
}
TRAIN_TEMPLATES = ["What color is {x}?", "Tell me the color of {x}.", "Which color has {x}?", "Color of {x}?"]
EVAL_TEMPLATES = ["What is the usual color of {x}?", "Name the color of {x}."]
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny"
CHAT_DIR = DATA_DIR.parent / "tiny-chat"
TRAIN_FOLLOW_UPS = ["And {x}?", "What about {x}?"]
EVAL_FOLLOW_UPS = ["How about {x}?", "And the color of {x}?"]


def conversation(template: str, thing: str, colour: str) -> dict:
    return {"messages": [
        {"role": "user", "content": template.format(x=thing)},
        {"role": "assistant", "thinking": f"{thing} is usually {colour}.", "content": colour},
    ]}


def rows(templates: list[str]) -> list[dict]:
    out = [conversation(t, x, c) for c, things in COLOURS.items() for x in things for t in templates]
    random.Random(0).shuffle(out)
    return out


def chat_rows(templates: list[str], follow_ups: list[str], n: int, seed: int) -> list[dict]:
    """``n`` three-turn ShareGPT chats: a first question, then two follow-ups about other objects."""
    rng = random.Random(seed)
    things = [(x, c) for c, xs in COLOURS.items() for x in xs]
    out = []
    for _ in range(n):
        turns = []
        for i, (thing, colour) in enumerate(rng.sample(things, 3)):
            question = rng.choice(templates if i == 0 else follow_ups).format(x=thing)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": colour}]
        out.append({"conversations": turns})
    return out


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def expected_files() -> dict[str, str]:
    return {"train.jsonl": jsonl(rows(TRAIN_TEMPLATES)), "eval.jsonl": jsonl(rows(EVAL_TEMPLATES))}


def expected_chat_files() -> dict[str, str]:
    return {"train.jsonl": jsonl(chat_rows(TRAIN_TEMPLATES, TRAIN_FOLLOW_UPS, 96, seed=1)),
            "eval.jsonl": jsonl(chat_rows(EVAL_TEMPLATES, EVAL_FOLLOW_UPS, 32, seed=2))}


if __name__ == "__main__":
    for folder, files in ((DATA_DIR, expected_files()), (CHAT_DIR, expected_chat_files())):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
