"""The README's fenced shell blocks, section by section, as the commands a reader types: continuation
lines joined, comments and blank lines dropped. Tests run these commands (with their own places and step
counts swapped in) so that the README cannot drift from what works."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL = ("bash", "sh", "shell", "console")


def sections(text: str | None = None) -> dict[str, str]:
    """`## Title` -> the text up to the next `## ` heading (`###` stays inside its section)."""
    text = README.read_text() if text is None else text
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def shell_blocks(body: str) -> list[str]:
    """The fenced blocks of `body` whose language is a shell's (a block with no language is output)."""
    return [code for lang, code in re.findall(r"^```(\w*)\n(.*?)^```", body, flags=re.DOTALL | re.MULTILINE)
            if lang in SHELL]


def commands(block: str) -> list[str]:
    """One string per command, as a shell reads the block: a newline inside quotes or after `\\` does not end
    a command; `# ...` outside quotes is a comment. The command keeps its quotes, for a shell to run."""
    out, current, quote, i = [], [], None, 0
    while i < len(block):
        ch = block[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch == "\\" and block[i + 1:i + 2] == "\n":
            current.append(" ")
            i += 2
            continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (not current or current[-1].isspace()):
            while i < len(block) and block[i] != "\n":
                i += 1
            continue
        elif ch == "\n":
            out.append("".join(current))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    assert quote is None, f"unclosed {quote} in a README block: {block!r}"
    out.append("".join(current))
    return [" ".join(c.split()) if "'" not in c and '"' not in c else c.strip() for c in out if c.strip()]


def marked_block(marker: str, text: str | None = None) -> str:
    """The block right after `<!-- marker -->`."""
    text = README.read_text() if text is None else text
    found = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert found, f"README has no block marked {marker}"
    return found.group(1)


def section_commands(title: str, text: str | None = None) -> list[str]:
    """Every command of every shell block in the section `title`."""
    body = sections(text).get(title)
    assert body is not None, f"README has no section '## {title}'"
    return [c for block in shell_blocks(body) for c in commands(block)]
