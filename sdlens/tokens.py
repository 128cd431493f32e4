"""Prompt -> CLIP tokens -> words: which of the text encoder's 77 slots belong to which word.

Cross-attention has one key per token *slot* (77 for Stable Diffusion 1.x), but people think
in words. CLIP's byte-pair encoding splits some words into several tokens ("photorealistic"
-> "photo" "realistic"), splits punctuation off ("circle," -> "circle" ","), and fills the
slots after the prompt with a start token, an end token and padding. `tokenize` records all of
that in a `Tokenization`, so a word's attention map can be built from exactly its slots.

A "word" is a whitespace-separated piece of the prompt, as the tokenizer sees it after its
own cleaning (Unicode NFC, lower case). A "token" is one CLIP BPE token.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TokenError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CLIP_TOKENIZER_DIR", "Tokenization", "load_clip_tokenizer", "tokenize"]

CLIP_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "data" / "clip_tokenizer"
"""The shipped tokenizer files of openai/clip-vit-large-patch14 (the SD 1.x text tokenizer)."""

DEFAULT_MAX_LENGTH = 77  # CLIP's context length; used when a tokenizer does not declare one

# What CLIP's tokenizer treats as a word boundary: Unicode whitespace. Python's str.split()
# would also split on the separators U+001C..U+001F, which CLIP keeps as (byte) tokens.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
_END_OF_WORD = "</w>"  # CLIP BPE's mark of a word's end
_WORD_START = "\u2581"  # T5 SentencePiece's mark of a word's start ("▁")


@functools.lru_cache(maxsize=1)
def load_clip_tokenizer() -> PreTrainedTokenizerBase:
    """CLIP ViT-L/14's tokenizer, loaded offline from the files shipped in `CLIP_TOKENIZER_DIR`.

    It gives the same ids as the tokenizer of Stable Diffusion 1.x pipelines: start 49406,
    end 49407, padding with the end token, 77 slots. The result is cached; do not modify it.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


@dataclass(frozen=True)
class Tokenization:
    """How one prompt fills the text encoder's slots, and which slots belong to which word.

    Attributes:
        prompt: the prompt as given.
        ids: token ids of every slot, padded to the tokenizer's length (77 for CLIP).
        tokens: a display string per slot: "<start>", the BPE token without its "</w>"
            end-of-word marker, "<end>" or "<pad>".
        kinds: per slot, one of "start", "word", "end", "pad".
        words: the prompt's whitespace-separated words as the tokenizer sees them (cleaned,
            lower case); only words that reached the slots (a word cut by truncation is kept
            with the slots it got).
        word_tokens: for each word, the slot indices of its tokens.
        token_word: for each slot, the index of its word, or None (start, end, padding).
        truncated: True when some of the prompt did not fit in the slots.
    """

    prompt: str
    ids: list[int]
    tokens: list[str]
    kinds: list[str]
    words: list[str]
    word_tokens: list[list[int]]
    token_word: list[int | None]
    truncated: bool

    @property
    def n_real(self) -> int:
        """Number of slots that carry the prompt: the start token, the word tokens and the end token."""
        return sum(kind != "pad" for kind in self.kinds)

    @property
    def word_labels(self) -> list[str]:
        """A name for each word that tells repeats apart: ``"red"``, or ``"red (1)"``, ``"red (2)"``
        for a word the prompt holds twice. ``word_index`` accepts these names."""
        counts = Counter(self.words)
        seen: Counter = Counter()
        labels = []
        for w in self.words:
            seen[w] += 1
            labels.append(w if counts[w] == 1 else f"{w} ({seen[w]})")
        return labels

    def word_index(self, word: str, occurrence: int | None = None) -> int:
        """Index into `words` of `word`, a word of the prompt or one of `word_labels`.

        Matching ignores case, and falls back to ignoring punctuation at the ends of words, so
        "circle" finds "circle,". When the word occurs more than once, `occurrence` (0, 1, ...)
        or a label (``"red (2)"``) picks one; leaving both out is then an error (``TokenError``).
        Resolved by ``sdlens.select.select_word``, as everywhere.
        """
        from .select import select_word

        return select_word(self, word, occurrence=occurrence, error=TokenError)

    def word_indices(self, word: str) -> list[int]:
        """Indices into `words` of every occurrence of `word` (case and end punctuation ignored)."""
        for key in (str.lower, _strip_punctuation):
            wanted = key(word.strip())
            matches = [i for i, w in enumerate(self.words) if key(w) == wanted]
            if matches:
                return matches
        return []


def tokenize(
    prompt: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
) -> Tokenization:
    """Tokenize `prompt` as a Stable Diffusion pipeline does, and align the tokens with the words.

    Args:
        prompt: the text prompt.
        tokenizer: any Hugging Face tokenizer with CLIP's byte-pair encoding, such as a pipeline's
            `tokenizer` or SDXL's `tokenizer_2` (which pads with "!"); default `load_clip_tokenizer()`.
        max_length: number of slots; default the tokenizer's `model_max_length` (77 for CLIP).

    Example:
        >>> t = tokenize("A photorealistic red circle, a red square")
        >>> t.tokens[:8]
        ['<start>', 'a', 'photo', 'realistic', 'red', 'circle', ',', 'a']
        >>> t.kinds[:2], t.kinds[10:12], len(t.ids)
        (['start', 'word'], ['end', 'pad'], 77)
        >>> t.words
        ['a', 'photorealistic', 'red', 'circle,', 'a', 'red', 'square']
        >>> t.word_tokens[t.word_index("photorealistic")], t.word_tokens[t.word_index("circle")]
        ([2, 3], [5, 6])
        >>> t.word_index("red", occurrence=1)
        5
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    tokenizer = load_clip_tokenizer() if tokenizer is None else tokenizer
    if max_length is None:
        max_length = tokenizer.model_max_length
        if not 2 < max_length <= 100_000:  # "no limit" is stored as a huge number
            max_length = DEFAULT_MAX_LENGTH
    # The slots, exactly as a pipeline encodes the prompt.
    encoded = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)
    ids: list[int] = list(encoded["input_ids"])
    # CLIP adds a start and an end token; T5 (SentencePiece) only an end token
    bos = tokenizer.bos_token_id
    start = 1 if bos is not None and ids and ids[0] == bos else 0
    end = 1 if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids[start:] else 0
    if max_length < start + end + 1:
        raise TokenError(f"max_length must leave room for a word beside the start and end tokens, got {max_length}")

    # CLIP's and T5's pre-tokenizers never join characters across whitespace, so tokenizing each
    # word on its own gives the same tokens, in order; _check_aligned checks that rather than trust it.
    pieces = [p for p in _WHITESPACE.split(prompt) if p]
    per_piece: list[list[int]] = (
        tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"] if pieces else []
    )
    n_word_slots = sum(len(p) for p in per_piece)
    kept = min(n_word_slots, max_length - start - end)  # word slots that fit; the rest is truncated
    _check_aligned(prompt, tokenizer, ids, per_piece, start, kept, end)

    n_pad = max_length - start - kept - end
    readable = [_readable(t) for t in tokenizer.convert_ids_to_tokens(ids[start : start + kept])]
    tokens = ["<start>"] * start + readable + ["<end>"] * end + ["<pad>"] * n_pad
    kinds = ["start"] * start + ["word"] * kept + ["end"] * end + ["pad"] * n_pad
    words, word_tokens, token_word = _word_slots(tokenizer, per_piece, start, kept, max_length)
    return Tokenization(
        prompt=prompt,
        ids=ids,
        tokens=tokens,
        kinds=kinds,
        words=words,
        word_tokens=word_tokens,
        token_word=token_word,
        truncated=n_word_slots > kept,
    )


def _check_aligned(prompt: str, tokenizer, ids: list[int], per_piece: list[list[int]], start: int, kept: int,
                   end: int) -> None:
    """The words' tokens, one after another, are the prompt's word slots; then its end token and padding."""
    flat = [i for piece in per_piece for i in piece]
    n_real = start + kept + end
    if (
        ids[start : start + kept] != flat[:kept]
        or (end and ids[n_real - 1] != tokenizer.eos_token_id)
        or any(i != tokenizer.pad_token_id for i in ids[n_real:])
    ):
        raise RuntimeError(
            f"could not align the tokens of {prompt!r} with its words: is {type(tokenizer).__name__} "
            "a CLIP (BPE) or T5 (SentencePiece) tokenizer?"
        )


def _word_slots(tokenizer, per_piece: list[list[int]], start: int, kept: int, max_length: int
                ) -> tuple[list[str], list[list[int]], list[int | None]]:
    """``(words, word_tokens, token_word)``: each whitespace-separated word that kept a slot, its slots,
    and each slot's word (None for start, end and padding)."""
    words: list[str] = []
    word_tokens: list[list[int]] = []
    token_word: list[int | None] = [None] * max_length
    slot = start
    for piece_ids in per_piece:
        slots = [s for s in range(slot, slot + len(piece_ids)) if s < start + kept]
        slot += len(piece_ids)
        if not slots:  # empty (cleaned away) or past the end
            continue
        for s in slots:
            token_word[s] = len(words)
        words.append(_readable(tokenizer.convert_ids_to_tokens(piece_ids)))
        word_tokens.append(slots)
    return words, word_tokens, token_word


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """CLIP's (and GPT-2's) stand-in character -> byte table, the inverse of the BPE byte alphabet."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    moved = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


def _readable(bpe_tokens: str | list[Any]) -> str:
    """The text that BPE tokens stand for, without end-of-word markers.

    Bytes that do not form whole UTF-8 characters (a character split across tokens) are shown
    as escapes such as "\\xf0".
    """
    if isinstance(bpe_tokens, str):
        bpe_tokens = [bpe_tokens]
    decoder = _byte_decoder()
    data = bytearray()
    for i, token in enumerate(bpe_tokens):
        text = str(token).removesuffix(_END_OF_WORD)
        if text.startswith(_WORD_START):  # SentencePiece's mark of a word's start
            text = ("" if i == 0 else " ") + text[len(_WORD_START):]
        for char in text:
            if char in decoder:
                data.append(decoder[char])
            else:  # not a byte stand-in (e.g. a special token's text): keep it as it is
                data.extend(char.encode("utf-8"))
    return data.decode("utf-8", errors="backslashreplace") or (_WORD_START if bpe_tokens else "")


def _strip_punctuation(word: str) -> str:
    """Lower-case `word` without the non-alphanumeric characters at its ends ("Circle," -> "circle")."""
    start, end = 0, len(word)
    while start < end and not word[start].isalnum():
        start += 1
    while end > start and not word[end - 1].isalnum():
        end -= 1
    return word[start:end].lower()
