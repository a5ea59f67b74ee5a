"""Sections of docs/benchmarks.md that one script writes between two marker lines and the others keep.

A script that measures one section (bench_fsdp.py, bench_auto.py) puts it between ``<!-- NAME: begin -->`` and
``<!-- NAME: end -->``; bench_calibration.py, which regenerates sections 1-5, carries every marked section over.
"""

from __future__ import annotations

import re

_MARKED = re.compile(r"<!-- (?P<name>[\w.-]+): begin -->\n.*?<!-- (?P=name): end -->\n?", re.S)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def wrap(name: str, body: str) -> str:
    """``body`` between ``name``'s markers."""
    begin, end = markers(name)
    return f"{begin}\n{body.rstrip()}\n{end}\n"


def marked_section(text: str, name: str) -> str | None:
    """``name``'s marked section of ``text`` (markers included), None if it has none."""
    begin, end = markers(name)
    if begin not in text or end not in text:
        return None
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end + "\n"


def put_section(text: str, section: str, name: str) -> str:
    """``text`` with ``name``'s marked section replaced by ``section`` (or inserted before "## GPU", or appended)."""
    begin, end = markers(name)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section.rstrip("\n") + rest.split(end, 1)[1]
    if "\n## GPU" in text:
        head, tail = text.split("\n## GPU", 1)
        return head + "\n" + section + "\n## GPU" + tail
    return text + ("\n" if text and not text.endswith("\n") else "") + section


def keep_marked_sections(text: str, old: str) -> str:
    """``text`` with every marked section of ``old`` carried over (the scripts that wrote them did not run)."""
    for match in _MARKED.finditer(old):
        text = put_section(text, match.group(0), match.group("name"))
    return text
