"""Sections of docs/benchmarks.md that one script writes between two marker lines and the others keep.

A script that measures one section (bench_fsdp.py, bench_auto.py, bench_setup_cost.py) puts it between
``<!-- NAME: begin -->`` and ``<!-- NAME: end -->``; bench_calibration.py, which regenerates sections 1-5, carries
every marked section over.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

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


def section_script_main(argv, doc: str, name: str, json_suffix: str, default_out: Path,
                        measure: Callable[[str], dict], render: Callable[[dict, str, str], str],
                        json_name: str | None = None) -> int:
    """The command line every one-section script shares: ``--smoke``, ``--out``, ``--note``; measure single-threaded,
    write the raw data beside ``--out`` (``<stem>_<json_suffix>.json``, or ``json_name`` when given) and the section
    between its markers."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one tiny setup and seed: checks the script runs")
    p.add_argument("--out", default=str(default_out))
    p.add_argument("--note", default="", help="a sentence about the machine during the run")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    data = measure("smoke" if args.smoke else "full")
    command = f"python benchmarks/{name}" + (" --smoke" if args.smoke else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(json_name or f"{out.stem}_{json_suffix}.json").write_text(json.dumps(data, indent=2))
    text = out.read_text() if out.exists() else ""
    out.write_text(put_section(text, render(data, command, args.note), name))
    print(f"-> {out}")
    return 0
