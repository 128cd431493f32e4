"""A Griffe extension for the API reference (``mkdocs.yml``: mkdocstrings' ``extensions``): sdlens's docstrings
are plain text meant for ``help()``; three of their habits read as something else in Markdown, and are
rewritten here before the docstring is parsed (the source is not touched):

- a doctest written flush left (``>>> render(scene)`` and its output, up to a blank line) would be a block
  quote run into one paragraph: it becomes a fenced ``pycon`` block;
- a paragraph of fields, one per line (``mask:  (H, W) bool, the object's pixels``; a line indented under a
  field continues it), would run into one paragraph: it becomes a list, each name in code;
- a Google-style ``Example:`` over doctests would be an admonition whose ``>>>`` lines run together: it
  becomes ``Examples:``, the section Griffe reads doctests from;
- reStructuredText's literal block (``Example::`` and an indented block under it) would lose the code's line
  breaks: it becomes ``Example:`` and a fenced block (``python`` where the block parses as Python).
"""

from __future__ import annotations

import ast
import re
import textwrap

import griffe

FIELD = re.compile(r"^([A-Za-z_*][\w.*]*(?:, [A-Za-z_*][\w.*]*)*):\s+(\S.*)$")


def _literal_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if line.rstrip().endswith("::") and j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > indent:
            k = j
            while k < len(lines) and (not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) > indent):
                k += 1
            while not lines[k - 1].strip():
                k -= 1
            block = textwrap.dedent("\n".join(lines[j:k]))
            try:
                ast.parse(block)
                language = "python"
            except SyntaxError:
                language = "text"
            pad = " " * indent
            out += [line.rstrip()[:-1], "", f"{pad}```{language}", *(pad + b if b else b for b in block.splitlines()),
                    f"{pad}```"]
            i = k
        else:
            out.append(line)
            i += 1
    return out


def _example_sections(lines: list[str]) -> list[str]:
    out = list(lines)
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "Example:" and lines[i + 1].strip().startswith(">>>"):
            out[i] = line.replace("Example:", "Examples:")
    return out


def _fence_doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        if lines[i].startswith(">>>") and not in_fence:
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += ["```pycon", *block, "```", ""]
        else:
            in_fence ^= lines[i].lstrip().startswith("```")
            out.append(lines[i])
            i += 1
    return out


def _field_lists(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_fence = False
    start = 0
    for end in [*(i for i, line in enumerate(lines) if not line.strip()), len(lines)]:
        para = lines[start:end]
        start = end + 1
        fences = sum(line.lstrip().startswith("```") for line in para)
        fields = [FIELD.match(line) for line in para]
        if not in_fence and para and fields[0] and sum(bool(m) for m in fields) >= 2:
            items: list[str] = []
            rest: list[str] = []
            for line, m in zip(para, fields):
                if rest:
                    rest.append(line)
                elif m:
                    items.append(f"- `{m[1]}`: {m[2]}")
                elif line.startswith((" ", "\t")):
                    items[-1] += " " + line.strip()
                else:  # a closing sentence after the fields
                    rest.append(line)
            out += items + ([""] + rest if rest else [])
        else:
            out += para
        out.append("")
        in_fence ^= fences % 2 == 1
    return out[:-1]


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its plain-text habits written as Markdown."""
    return "\n".join(_field_lists(_fence_doctests(_literal_blocks(_example_sections(text.splitlines())))))


class PlainTextDocstrings(griffe.Extension):
    """Rewrites every docstring with ``to_markdown`` as Griffe reads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
