"""Train and write a tiny Kimi-format tokenizer for generated test checkpoints.

`write_tokenizer_files` produces the same three files a real Kimi-K2.5 directory has
(`tiktoken.model`, `tokenizer_config.json`, `chat_template.jinja`), with a small byte-level BPE
vocabulary trained on `shared/data/tiny_corpus.txt` using Kimi's pre-tokenizer. Special tokens
sit at `num_base_tokens + k` exactly where real Kimi has them at `163584 + k`, so code that
looks ids up by name works unchanged on both.

Training is deterministic: pure Python over a checked-in corpus, ties broken by token id, so
every run on every machine writes the same bytes.
"""

from __future__ import annotations

import base64
import heapq
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import regex

from shared.tokenizer import (
    CONFIG_FILE,
    NUM_RESERVED_SPECIAL_TOKENS,
    PAT_STR,
    VOCAB_FILE,
)

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
CORPUS_PATH = DATA_DIR / "tiny_corpus.txt"
CHAT_TEMPLATE_PATH = DATA_DIR / "chat_template.jinja"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Named specials by offset from the first special id (real Kimi: 163584 + offset).
# Offsets not listed are `<|reserved_token_{id}|>`.
KIMI_SPECIAL_OFFSETS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    18: "<|media_begin|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    22: "<think>",
    23: "</think>",
    254: "[UNK]",
    255: "[PAD]",
}
# Kimi-K2's config marks the tool-call markers `special: false`, so decoding with
# skip_special_tokens keeps them (spec section 8.2).
NOT_SKIPPED_OFFSETS = frozenset(range(11, 16))


def write_tokenizer_files(out_dir: str | Path, num_base_tokens: int = 1792) -> dict[str, int]:
    """Train the tiny vocabulary and write a tokenizer directory.

    Writes `tiktoken.model`, `tokenizer_config.json` and `chat_template.jinja` into
    `out_dir` (created if missing). Returns the ids a checkpoint's `config.json` needs:
    `bos_token_id`, `eos_token_id`, `im_end_token_id`, `media_placeholder_token_id`,
    `pad_token_id`, plus `vocab_size` (base ranks + 256 specials).
    """
    assert num_base_tokens >= 256, "the vocabulary must hold all 256 byte tokens"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = train_bpe(CORPUS_PATH.read_text(encoding="utf-8"), num_base_tokens)
    _write_vocab(out_dir / VOCAB_FILE, tokens)
    config = tokenizer_config(num_base_tokens)
    (out_dir / CONFIG_FILE).write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    shutil.copyfile(CHAT_TEMPLATE_PATH, out_dir / CHAT_TEMPLATE_FILE)
    logger.info("wrote tokenizer with %d base tokens to %s", num_base_tokens, out_dir)
    return {
        "bos_token_id": num_base_tokens + 0,
        "eos_token_id": num_base_tokens + 1,
        "im_end_token_id": num_base_tokens + 2,
        "media_placeholder_token_id": num_base_tokens + 21,
        "pad_token_id": num_base_tokens + 255,
        "vocab_size": num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS,
    }


def tokenizer_config(num_base_tokens: int) -> dict:
    """`tokenizer_config.json` contents with the full 256-id special block."""
    decoder = {}
    for offset in range(NUM_RESERVED_SPECIAL_TOKENS):
        token_id = num_base_tokens + offset
        decoder[str(token_id)] = {
            "content": KIMI_SPECIAL_OFFSETS.get(offset, f"<|reserved_token_{token_id}|>"),
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": offset not in NOT_SKIPPED_OFFSETS,
        }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            name for name in KIMI_SPECIAL_OFFSETS.values() if name.startswith("<")
        ],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "tokenizer_class": "TikTokenTokenizer",
    }


def _write_vocab(path: Path, tokens: list[bytes]) -> None:
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(tokens)]
    path.write_text("".join(lines), encoding="ascii")


def train_bpe(text: str, num_tokens: int) -> list[bytes]:
    """Byte-level BPE: the 256 byte tokens, then merges until `num_tokens` tokens exist.

    Returns token bytes in rank order. The most frequent adjacent pair (inside one
    pre-tokenizer piece) is merged first; ties go to the smallest pair of ids.
    """
    pattern = regex.compile(PAT_STR, flags=regex.V1)
    word_counts = Counter(piece.encode("utf-8") for piece in pattern.findall(text))
    trainer = _BpeTrainer(list(word_counts.items()))
    while len(trainer.vocab) < num_tokens:
        if not trainer.merge_best():
            raise ValueError(
                f"corpus too small: only {len(trainer.vocab)} tokens, {num_tokens} asked"
            )
    return trainer.vocab


class _BpeTrainer:
    """Pair counts kept up to date incrementally: a merge only revisits words holding the
    pair, and a lazy max-heap (stale entries skipped) picks the next pair."""

    def __init__(self, words: list[tuple[bytes, int]]) -> None:
        self.vocab: list[bytes] = [bytes([b]) for b in range(256)]
        self._ids: dict[bytes, int] = {tok: i for i, tok in enumerate(self.vocab)}
        self._words = [list(word) for word, _ in words]
        self._freqs = [count for _, count in words]
        self._pair_counts: Counter[tuple[int, int]] = Counter()
        self._pair_words: dict[tuple[int, int], set[int]] = {}
        self._changed: set[tuple[int, int]] = set()
        for w, seq in enumerate(self._words):
            self._add_pairs(w, seq, +1)
        self._heap = [(-count, pair) for pair, count in self._pair_counts.items()]
        heapq.heapify(self._heap)
        self._changed.clear()

    def merge_best(self) -> bool:
        """Merge the best pair; False when no pair is left."""
        while self._heap:
            neg_count, pair = heapq.heappop(self._heap)
            if self._pair_counts.get(pair, 0) == -neg_count and neg_count < 0:
                self._merge(pair)
                return True
        return False

    def _merge(self, pair: tuple[int, int]) -> None:
        merged = self.vocab[pair[0]] + self.vocab[pair[1]]
        new_id = self._ids.get(merged)
        if new_id is None:  # the same bytes can arise from two different pairs
            new_id = len(self.vocab)
            self.vocab.append(merged)
            self._ids[merged] = new_id
        for w in sorted(self._pair_words.pop(pair, ())):
            seq = self._words[w]
            self._add_pairs(w, seq, -1)
            self._words[w] = seq = _replace_pair(seq, pair, new_id)
            self._add_pairs(w, seq, +1)
        self._pair_counts.pop(pair, None)
        self._push_changed()

    def _add_pairs(self, w: int, seq: list[int], sign: int) -> None:
        freq = self._freqs[w] * sign
        for pair in zip(seq, seq[1:]):
            self._pair_counts[pair] += freq
            self._changed.add(pair)
            if sign > 0:
                self._pair_words.setdefault(pair, set()).add(w)

    def _push_changed(self) -> None:
        for pair in sorted(self._changed):
            count = self._pair_counts.get(pair, 0)
            if count > 0:
                heapq.heappush(self._heap, (-count, pair))
            else:
                self._pair_counts.pop(pair, None)
        self._changed = set()


def _replace_pair(seq: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out
