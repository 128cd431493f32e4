"""The shipped CLIP tokenizer, checked against open_clip's own tokenizer, and the word alignment of sdlens.tokens.

open_clip ships OpenAI's original CLIP tokenizer (`open_clip/tokenizer.py`, a pure-Python BPE).
`import open_clip` needs torchvision, so the single file is loaded by path.

Some differences between open_clip and the Hugging Face tokenizer that SD pipelines use are
known and expected, and the comparison accounts for them:
  * padding: open_clip pads with 0, Hugging Face (and SD 1.x) with the end token 49407;
  * cleaning: open_clip runs ftfy.fix_text and html.unescape on the prompt (curly quotes become
    straight, "&amp;" becomes "&", full-width letters become ASCII, control characters go);
    transformers 5's CLIP tokenizer only applies NFC, whitespace collapsing and lower case.
    Strings that ftfy/html change are compared after applying open_clip's cleaning first;
  * lower case: a capital sigma that ends a word becomes "ς" with Python's str.lower (open_clip)
    and "σ" with the tokenizers library (see LOWER_CASE);
  * special-token text: "<|endoftext|>" typed in a prompt is the end token for Hugging Face and
    plain text for open_clip (which names its special tokens "<end_of_text>"); left out.
"""

from __future__ import annotations

import importlib.util
import random
import unicodedata
from pathlib import Path

import pytest
from _load import load_module

from sdlens.errors import TokenError
from sdlens.tokens import CLIP_TOKENIZER_DIR, Tokenization, load_clip_tokenizer, tokenize

REPO = Path(__file__).resolve().parent.parent
BOS, EOS = 49406, 49407


def _open_clip_file(name: str) -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    path = _open_clip_file("tokenizer.py")
    if path is None or _open_clip_file("bpe_simple_vocab_16e6.txt.gz") is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    return load_module(path, "_open_clip_tokenizer")


@pytest.fixture(scope="module")
def clip():
    return load_clip_tokenizer()


# ---------------------------------------------------------------------------------------------
# The strings to compare: hand-picked edge cases, then deterministic random prompts.

HAND_PICKED = [
    "",
    " ",
    "\t\n  ",
    "a photo of a cat",
    "A photorealistic red circle, a blue square.",
    "a red circle and a red square and a red triangle",
    "An astronaut riding a horse on Mars, 4k, trending on ArtStation",
    "HELLO WORLD",
    "MiXeD CaSe WoRdS",
    "don't",
    "DON'T STOP",
    "it's we'll you've they're I'm he'd",
    "rock'n'roll o'clock",
    "'quoted' \"double quoted\"",
    "hello!!! what??? ...",
    "(masterpiece:1.2), [[best quality]], {highly detailed}",
    "a-b_c/d\\e|f~g`h^i",
    "#hashtag @mention $100 50% 3+4=7 a*b <tag>",
    "1234567890",
    "3.14159 2,718 1e-10 0x1F",
    "version 2.0.1-beta",
    "12:30pm 2024-01-31",
    "  leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand\nnewlines\r\n",
    "no\u00a0break\u2003em\u3000ideographic spaces",
    "café naïve résumé",
    "cafe\u0301 nai\u0308ve",  # NFD: decomposed accents
    "Ångström Øresund Æsir",
    "straße STRASSE",
    "Σίσυφος οδός ΣΟΦΙΑ",  # (a capital sigma that ends a word is lowered differently: see LOWER_CASE)
    "İstanbul ıi",
    "Привет, мир!",
    "こんにちは世界",
    "一只猫坐在垫子上",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी भाषा",
    "ภาษาไทย",
    "emoji 😀😃😄 🐱 🚀",
    "family 👨‍👩‍👧 flag 🇫🇷 thumbs 👍🏽",
    "★☆♥♦ ©®™ €£¥ ±×÷ °C µm",
    "½ ² ³ ⅓ ① Ⅳ",
    "arrows → ← ↑ ↓ ⇒",
    "math ∑ ∫ √ ∞ ≠ ≤",
    "tab\tseparated\tvalues",
    "...",
    ",",
    "a",
    "I",
    "photorealistic",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ab" * 60,
    "red " * 74 + "circle",
    "red " * 75 + "circle",
    "red " * 76 + "circle",
    "a photo of " * 40,
    "photorealistic " * 40,
    "😀" * 100,
    "一" * 100,
    "1 2 3 4 5 6 7 8 9 10 " * 8,
    "!" * 200,
    "word,word.word;word:word!word?",
    "e-mail x-ray T-shirt",
    "<b>bold</b> <i>italic</i>",
]

# Known to differ from open_clip because of ftfy/html cleaning: compared after cleaning.
CLEANING = [
    "don\u2019t \u201cquoted\u201d",  # curly quotes
    "rock &amp; roll &lt;3 &#169; &quot;hi&quot;",  # html entities
    "\uff21\uff22\uff23 \uff11\uff12\uff13",  # full-width letters and digits
    "\ufb01sh \ufb02ower",  # ligatures
    "caf\u00c3\u00a9",  # mojibake
    "a\x1cb\x1dc",  # control characters that ftfy removes
    "bell\x07 null\x00 del\x7f",
]

# Known to differ from open_clip because of lower-casing: Python's str.lower turns a capital
# sigma that ends a word into the final form "ς", the tokenizers library into "σ" (as the
# Hugging Face tokenizer of SD pipelines does). Compared after lower-casing with Python.
LOWER_CASE = ["ΟΔΟΣ", "ΣΑΣ φως", "Σίσυφος ΟΔΟΣ."]

WORDS = (
    "a an the of and with in on at by red blue green yellow circle square triangle cat dog horse "
    "astronaut portrait landscape painting photo photorealistic highly detailed cinematic lighting "
    "octane render unreal engine trending artstation masterpiece best quality 8k hdr bokeh "
    "sunset mountains ocean city night neon cyberpunk steampunk watercolor oil sketch"
).split()
PUNCTUATION = list(",.;:!?-()[]{}'\"/&%$#@*+=<>|~^_`")
EXTRA = [
    "don't",
    "it's",
    "I'm",
    "we'll",
    "they've",
    "café",
    "naïve",
    "straße",
    "東京",
    "猫",
    "😀",
    "🐶",
    "🚀",
    "Ωmega",
    "ñ",
    "Ünïcödé",
    "1.5",
    "2024",
    "x2",
    "3d",
    "RGB",
    "NASA",
    "McDonald's",
    "über-cool",
]


def _random_prompt(rng: random.Random) -> str:
    n_words = rng.choice([1, 2, 3, 5, 8, 12, 20, 40, 70, 90])
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.65:
            word = rng.choice(WORDS)
        elif r < 0.8:
            word = rng.choice(EXTRA)
        elif r < 0.9:
            word = str(rng.randrange(0, 10_000))
        else:
            word = "".join(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 3)))
        case = rng.random()
        if case < 0.1:
            word = word.upper()
        elif case < 0.2:
            word = word.capitalize()
        if rng.random() < 0.2:
            word += rng.choice(PUNCTUATION)
        parts.append(word)
        parts.append(rng.choice([" "] * 12 + ["  ", "\t", "\n", " \n "]))
    text = "".join(parts)
    return text.strip() if rng.random() < 0.8 else text


RANDOM = [_random_prompt(random.Random(seed)) for seed in range(250)]


def _changed_by_cleaning(oc, text: str) -> bool:
    """True when open_clip's ftfy/html cleaning changes `text` beyond what both tokenizers do anyway
    (NFC, collapsing whitespace)."""
    return oc.whitespace_clean(oc.basic_clean(text)) != oc.whitespace_clean(
        unicodedata.normalize("NFC", text)
    )


def _open_clip_ids(oc, tokenizer, texts: list[str]) -> list[list[int]]:
    """open_clip's ids, with its 0 padding replaced by the end token as SD's tokenizer pads."""
    rows = tokenizer(texts, context_length=77).tolist()
    out = []
    for row in rows:
        n = max(i for i, token in enumerate(row) if token != 0) + 1
        assert row[n - 1] == EOS
        out.append(row[:n] + [EOS] * (77 - n))
    return out


def _hf_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Comparison with open_clip


def test_special_ids_and_size(clip):
    assert len(clip) == 49408
    assert clip.bos_token == "<|startoftext|>" and clip.bos_token_id == BOS
    assert clip.eos_token == "<|endoftext|>" and clip.eos_token_id == EOS
    assert clip.pad_token == "<|endoftext|>" and clip.pad_token_id == EOS
    assert clip.model_max_length == 77


def test_same_ids_as_open_clip(clip, open_clip_tokenizer):
    oc = open_clip_tokenizer
    simple = oc.SimpleTokenizer()
    texts = [t for t in HAND_PICKED + RANDOM if not _changed_by_cleaning(oc, t)]
    assert len(texts) >= 200, "the comparison must cover at least 200 strings"
    ours, theirs = _hf_ids(clip, texts), _open_clip_ids(oc, simple, texts)
    differ = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not differ, f"{len(differ)} of {len(texts)} strings differ, first: {differ[0]}"
    # the strings did exercise truncation and padding
    assert any(row[76] == EOS and row[75] != EOS for row in ours)
    assert any(row[2] == EOS for row in ours)


def test_cleaning_is_the_only_difference(clip, open_clip_tokenizer):
    oc = open_clip_tokenizer
    simple = oc.SimpleTokenizer()
    assert all(_changed_by_cleaning(oc, t) for t in CLEANING)
    cleaned = [oc.basic_clean(t) for t in CLEANING]
    assert _hf_ids(clip, cleaned) == _open_clip_ids(oc, simple, CLEANING)


def test_final_sigma_is_the_only_lower_case_difference(clip, open_clip_tokenizer):
    oc = open_clip_tokenizer
    simple = oc.SimpleTokenizer()
    assert _hf_ids(clip, LOWER_CASE) != _open_clip_ids(oc, simple, LOWER_CASE)
    assert _hf_ids(clip, [t.lower() for t in LOWER_CASE]) == _open_clip_ids(oc, simple, LOWER_CASE)


def test_truncation_matches_open_clip(clip, open_clip_tokenizer):
    simple = open_clip_tokenizer.SimpleTokenizer()
    text = " ".join(f"w{i}" for i in range(100))  # "w", digit(s): far more than 75 tokens
    ours = _hf_ids(clip, [text])[0]
    theirs = simple([text], context_length=77)[0].tolist()
    assert ours == theirs  # no padding: both keep start + 75 tokens + end
    assert ours[0] == BOS and ours[76] == EOS and EOS not in ours[1:76]


def test_shipped_files_regenerate_byte_identically():
    if _open_clip_file("bpe_simple_vocab_16e6.txt.gz") is None:
        pytest.skip("open_clip_torch is not installed")
    build = load_module("scripts/build_clip_tokenizer.py")
    files = build.render_files(build.read_merges(build.find_merges_file()))
    assert sorted(files) == sorted(
        p.name for p in CLIP_TOKENIZER_DIR.iterdir() if p.suffix in (".json", ".txt")
    )
    for name, text in files.items():
        assert (CLIP_TOKENIZER_DIR / name).read_bytes() == text.encode("utf-8"), name


def test_data_files_are_found_through_the_package():
    import sdlens.tokens

    package_dir = Path(sdlens.tokens.__file__).resolve().parent
    assert CLIP_TOKENIZER_DIR.is_relative_to(package_dir)
    assert CLIP_TOKENIZER_DIR == package_dir / "data" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (CLIP_TOKENIZER_DIR / name).is_file(), name


# ---------------------------------------------------------------------------------------------
# Word alignment


def _check_consistent(t: Tokenization) -> None:
    assert len(t.ids) == len(t.tokens) == len(t.kinds) == len(t.token_word)
    assert len(t.words) == len(t.word_tokens)
    for w, slots in enumerate(t.word_tokens):
        assert slots and slots == list(range(slots[0], slots[-1] + 1))
        assert all(t.token_word[s] == w and t.kinds[s] == "word" for s in slots)
    assert [s for s, k in enumerate(t.kinds) if k == "word"] == [s for slots in t.word_tokens for s in slots]
    assert t.kinds[0] == "start" and t.kinds[t.n_real - 1] == "end"
    assert all(k == "pad" for k in t.kinds[t.n_real :])
    assert t.tokens[0] == "<start>" and t.tokens[t.n_real - 1] == "<end>"
    assert all(tok == "<pad>" for tok in t.tokens[t.n_real :])


def test_alignment_on_all_strings(clip):
    for text in HAND_PICKED + CLEANING + LOWER_CASE + RANDOM:
        t = tokenize(text, clip)
        _check_consistent(t)
        assert t.ids == _hf_ids(clip, [text])[0]


def test_multi_token_word_and_punctuation():
    t = tokenize("A photorealistic red circle, on grass")
    assert t.words == ["a", "photorealistic", "red", "circle,", "on", "grass"]
    assert t.tokens[:9] == ["<start>", "a", "photo", "realistic", "red", "circle", ",", "on", "grass"]
    assert t.word_tokens[1] == [2, 3] and t.word_tokens[3] == [5, 6]
    assert t.word_index("photorealistic") == 1
    assert t.word_index("circle") == 3 and t.word_index("circle,") == 3 and t.word_index("CIRCLE") == 3
    assert t.kinds[:11] == ["start"] + ["word"] * 8 + ["end", "pad"]
    assert t.token_word[:10] == [None, 0, 1, 1, 2, 3, 3, 4, 5, None]
    assert t.n_real == 10 and not t.truncated
    assert t.ids[0] == BOS and t.ids[9:] == [EOS] * 68


def test_repeated_words_need_an_occurrence_or_a_label():
    t = tokenize("a red circle and a red square")
    with pytest.raises(TokenError, match="occurs 2 times") as err:
        t.word_index("red")
    assert "'red (1)' (word 1, slots [2])" in str(err.value) and "'red (2)' (word 5, slots [6])" in str(err.value)
    assert t.word_labels == ["a (1)", "red (1)", "circle", "and", "a (2)", "red (2)", "square"]
    assert t.word_index("red (1)") == 1 and t.word_index("RED (2)") == 5
    with pytest.raises(TokenError, match="not a word"):
        t.word_index("red (3)")
    with pytest.raises(TokenError, match="not a word"):
        t.word_index("circle (1)")  # "circle" occurs once: its label has no number
    assert t.word_index("red", occurrence=0) == 1
    assert t.word_index("red", occurrence=1) == 5
    with pytest.raises(TokenError, match="out of range"):
        t.word_index("red", occurrence=2)
    with pytest.raises(TokenError, match="not a word") as err:
        t.word_index("triangle")
    assert "'square'" in str(err.value)


def test_whitespace_case_and_apostrophes():
    t = tokenize("  DON'T\t\tstop \n  Café  ")
    assert t.words == ["don't", "stop", "café"]
    assert t.tokens[1:4] == ["don", "'t", "stop"]
    assert t.word_tokens[0] == [1, 2]


def test_unicode_tokens_are_readable():
    t = tokenize("東京 😀")
    assert t.words == ["東京", "😀"]
    # a character split across tokens shows as byte escapes in the slots, whole in the word
    assert [t.tokens[s] for s in t.word_tokens[0]] == ["東", "\\xe4\\xba", "\\xac"]


def test_empty_prompt():
    t = tokenize("")
    assert t.words == [] and t.word_tokens == [] and t.n_real == 2 and not t.truncated
    assert t.kinds[:3] == ["start", "end", "pad"] and t.ids[:3] == [BOS, EOS, EOS]


def test_truncation():
    t = tokenize("red " * 100)
    assert t.truncated and t.n_real == 77 and len(t.ids) == 77
    assert len(t.words) == 75 and t.kinds[76] == "end" and "pad" not in t.kinds
    with pytest.raises(TokenError, match="occurs 75 times"):
        t.word_index("red")

    exact = tokenize("red " * 75)
    assert not exact.truncated and exact.n_real == 77 and len(exact.words) == 75

    # a word cut by truncation keeps the slot it got
    cut = tokenize("red " * 74 + "photorealistic cat")
    assert cut.truncated and cut.words[-1] == "photorealistic" and cut.word_tokens[-1] == [75]
    assert cut.tokens[75] == "photo" and "cat" not in cut.words


def test_max_length():
    t = tokenize("a photorealistic red circle", max_length=5)
    assert t.ids == [BOS, 320, 1153, 16157, EOS] and t.truncated
    assert t.words == ["a", "photorealistic"] and t.word_tokens == [[1], [2, 3]]


def test_sdxl_style_pad_token():
    from transformers import CLIPTokenizer

    sdxl_2 = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!")
    assert sdxl_2.pad_token_id == 0
    t = tokenize("wow!~ a red circle!", sdxl_2)
    _check_consistent(t)
    assert t.words == ["wow!~", "a", "red", "circle!"]
    assert t.tokens[:10] == ["<start>", "wow", "!", "~", "a", "red", "circle", "!", "<end>", "<pad>"]
    assert t.ids[2] == 0  # the token "!" (not "!</w>") has the pad id, but it is a word's token
    assert t.kinds[2] == "word" and t.token_word[2] == 0
    assert t.ids[8] == EOS and t.ids[9:] == [0] * 68
    assert t.kinds[9:] == ["pad"] * 68 and t.n_real == 9
    # (transformers splits the pad token "!" out of the text as a special token, so the ids of
    # "!" can differ from those of CLIP's own tokenizer; the alignment follows whatever it does)
