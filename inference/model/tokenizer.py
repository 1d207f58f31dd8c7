"""Build the o200k_harmony tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``) offline.

gpt-oss checkpoints ship a Hugging Face tokenizer equivalent to openai-harmony's ``o200k_harmony`` encoding. We build
the same thing locally from the vocabulary that :mod:`inference.harmony` resolves offline: byte-level BPE ranks from
``o200k_base.tiktoken``, merges recovered from the ranks, the o200k pre-tokenizer pattern, and Harmony's special
tokens read from openai-harmony itself (so ids and names cannot drift). Tests check that it encodes exactly as
openai-harmony does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from inference import harmony

# The o200k split pattern (the same one tiktoken and openai-harmony use).
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
VOCAB_SIZE = 201088          # gpt-oss embedding rows (o200k_harmony incl. reserved specials)
FIRST_SPECIAL = 199998       # <|startoftext|>; everything from here up is a special token


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def special_tokens() -> dict[int, str]:
    """id -> name of every Harmony special token, as openai-harmony defines them."""
    enc = harmony.encoding()
    return {i: enc.decode([i]) for i in range(FIRST_SPECIAL, VOCAB_SIZE) if enc.is_special_token(i)}


def build_tokenizer_json() -> str:
    """The ``tokenizer.json`` text for o200k_harmony (deterministic)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    ranks = _read_ranks(harmony.ensure_vocab() / harmony.VOCAB_FILE)
    byte_map = _bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[as_str(token)] = rank
        # Every split of a token into two tokens is a merge producing it, ranked by the token's rank (tiktoken merges
        # the adjacent pair whose concatenation ranks lowest, whichever split it came from).
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_str(left), as_str(right)))
    merges.sort()
    tok = Tokenizer(BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tok.add_special_tokens([AddedToken(specials[i], normalized=False, special=True) for i in sorted(specials)])
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:  # pin ids to Harmony's (tokenizers appends them in order; check anyway)
        if specials.get(entry["id"]) != entry["content"]:
            raise RuntimeError(f"special token id mismatch for {entry['content']}")
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def tokenizer_config(model_max_length: int) -> dict:
    """``tokenizer_config.json`` as gpt-oss ships it (minus the Jinja chat template: Harmony renders for us)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def write_tokenizer(directory: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(build_tokenizer_json(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model_max_length), indent=2, sort_keys=True) + "\n", encoding="utf-8")
