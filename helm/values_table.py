"""The values table of helm/arserve/README.md, generated from the `# --`
comments of helm/arserve/values.yaml (helm-docs style, without helm-docs).

    python helm/values_table.py           # print the table
    python helm/values_table.py --write   # rewrite it in README.md
    python helm/values_table.py --check   # exit 1 when README.md is stale

A `# -- text` comment (continued by the `#` lines right after it) documents
the key on the next line. A documented map is documented as a whole; every
other value must carry its own comment (``undocumented`` lists the ones that
do not; the chart's tests require none)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "arserve"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_.\-/]+):(?:\s|$)")


def descriptions(text: str) -> dict[str, str]:
    """Dotted key path -> description, in file order."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing maps
    pending: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        if not stripped:
            pending = None
            continue
        m = _KEY.match(line)
        if not m:  # a list item or a continued flow value
            pending = None
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m["key"]])
        if pending is not None:
            docs[path] = " ".join(p for p in pending if p)
            pending = None
        stack.append((indent, m["key"]))
    return docs


def lookup(values: dict, path: str):
    node = values
    for part in path.split("."):
        node = node[part]
    return node


def undocumented(values: dict, docs: dict[str, str], prefix: str = "") -> list[str]:
    """Values covered by no `# --` comment (neither their own nor a parent map's)."""
    missing = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in docs:
            continue
        if isinstance(value, dict) and value:
            missing += undocumented(value, docs, path + ".")
        else:
            missing.append(path)
    return missing


def _type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def table(values_text: str | None = None) -> str:
    text = values_text if values_text is not None else VALUES.read_text()
    values = yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, desc in descriptions(text).items():
        value = lookup(values, path)
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        rows.append(f"| `{path}` | {_type(value)} | `{default}` | {desc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def readme_table(readme_text: str) -> str:
    """The table as README.md has it now (between the markers)."""
    start, end = readme_text.index(START) + len(START), readme_text.index(END)
    return readme_text[start:end].strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    p.add_argument("--check", action="store_true", help="exit 1 when README.md's table is stale")
    args = p.parse_args()
    values = yaml.safe_load(VALUES.read_text())
    missing = undocumented(values, descriptions(VALUES.read_text()))
    if missing:
        print(f"values without a `# --` comment: {missing}", file=sys.stderr)
        return 1
    generated = table()
    if args.write or args.check:
        readme = README.read_text()
        if args.check:
            if readme_table(readme) != generated:
                print("helm/arserve/README.md's values table is stale: run python helm/values_table.py --write",
                      file=sys.stderr)
                return 1
            return 0
        start, end = readme.index(START) + len(START), readme.index(END)
        README.write_text(readme[:start] + "\n" + generated + "\n" + readme[end:])
        return 0
    print(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
