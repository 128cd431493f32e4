"""Build the CLIP tokenizer files that sdlens ships, from the BPE merges file in open_clip.

Stable Diffusion 1.x encodes prompts with OpenAI's CLIP ViT-L/14 text tokenizer
(`openai/clip-vit-large-patch14` on the Hugging Face hub). Its vocabulary is not stored
anywhere on its own: it is *derived* from a list of byte-pair merges, and open_clip ships
that list as `bpe_simple_vocab_16e6.txt.gz`. This script re-derives the vocabulary and
writes it in the layout `transformers.CLIPTokenizer.from_pretrained(folder)` reads, so
sdlens can tokenize prompts with no network and no model download.

How the vocabulary is made (ids in brackets):
  1. the 256 printable stand-ins for the bytes 0..255 (GPT-2's byte-to-unicode table)  [0, 256)
  2. the same 256 characters with the end-of-word marker "</w>" appended               [256, 512)
  3. one entry per merge, the two halves glued together, in merge order               [512, 49406)
  4. "<|startoftext|>" and "<|endoftext|>"                                              49406, 49407
CLIP keeps only the first 49152 - 256 - 2 = 48894 merges of the file (line 0 is a header),
so the vocabulary has 512 + 48894 + 2 = 49408 entries.

Usage (from the repository root; needs open_clip_torch installed, but does not import it):
    python scripts/build_clip_tokenizer.py            # write sdlens/data/clip_tokenizer/
    python scripts/build_clip_tokenizer.py --check    # exit 1 if the shipped files differ

The output is deterministic: running the script again rewrites the files byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "sdlens" / "data" / "clip_tokenizer"

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary budget, less the byte tokens and the two specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length: start token + 75 prompt tokens + end token


def find_merges_file() -> Path:
    """Locate open_clip's gzipped merges file without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    sys.exit(f"bpe_simple_vocab_16e6.txt.gz not found in {list(spec.submodule_search_locations)}")


def byte_alphabet() -> list[str]:
    """The 256 characters that stand for the bytes 0..255, in byte order of the *vocabulary*.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space,
    a few Latin-1 gaps) are moved to code points 256, 257, ... so that every byte has a
    visible, non-whitespace character. The vocabulary lists the printable bytes first,
    then the moved ones, which is why this is not simply sorted by byte value.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    moved = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(moved))]


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..N_MERGES of the file, each "left right"."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = []
    for line in lines[1 : N_MERGES + 1]:
        left, right = line.split(" ")
        merges.append((left, right))
    if len(merges) != N_MERGES:
        raise ValueError(f"{path} has {len(merges)} usable merges, expected {N_MERGES}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = byte_alphabet()
    entries = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(entries)}
    if len(vocab) != len(entries):
        raise ValueError("duplicate vocabulary entries: the merges file is not CLIP's")
    return vocab


def render_files(merges: list[tuple[str, str]]) -> dict[str, str]:
    """File name -> exact text of each file to write."""
    vocab = build_vocab(merges)
    assert len(vocab) == 49408 and vocab[BOS] == 49406 and vocab[EOS] == 49407

    def as_json(obj: object) -> str:
        return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"

    special_tokens = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        **special_tokens,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    return {
        # one entry per line keeps the file reviewable; entries are in id order
        "vocab.json": as_json(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": as_json(config),
        "special_tokens_map.json": as_json(special_tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args()

    source = find_merges_file()
    files = render_files(read_merges(source))
    if args.check:
        stale = [
            n
            for n, text in files.items()
            if not (args.out / n).is_file() or (args.out / n).read_bytes() != text.encode("utf-8")
        ]
        if stale:
            sys.exit(f"out of date in {args.out}: {', '.join(stale)}")
        print(f"{args.out}: up to date")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_bytes(text.encode("utf-8"))  # bytes: no platform newline translation
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
