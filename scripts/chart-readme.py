#!/usr/bin/env python3
"""Writes helm/wsfleet/README.md from helm/wsfleet/values.yaml: every value
with its default and the comment above it, so the chart's README cannot
drift from its values (tests/helm_chart.rs runs this with --check).

    chart-readme.py           # rewrite the README
    chart-readme.py --check   # exit 1 if the README is not what it would write
"""
import os
import re
import sys

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VALUES = os.path.join(ROOT, "helm", "wsfleet", "values.yaml")
README = os.path.join(ROOT, "helm", "wsfleet", "README.md")

HEADER = """# wsfleet Helm chart

The gateway (`wsfleet serve`), optionally the controller (`wsfleet
controller`) and a single-instance Redis for trying it out. Install:

```sh
helm install wsfleet helm/wsfleet --namespace wsfleet --create-namespace
```

The repository's README ("Deploy on Kubernetes") walks from an empty cluster
to a first message. `values.schema.json` refuses unknown and mistyped values.
Every value, its default and what it does (generated from `values.yaml` by
`scripts/chart-readme.py`; edit the comments there):

| Value | Default | What |
|---|---|---|
"""


def default_of(value):
    if isinstance(value, dict):
        return "{}" if not value else "(map)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.replace("...", "").strip()
    if len(text) > 60:
        text = text[:57] + "..."
    return "`" + text.replace("|", "\\|") + "`" if text else '`""`'


def lookup(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def rows():
    values = yaml.safe_load(open(VALUES, encoding="utf-8"))
    stack = []  # (indent, key)
    comment = []
    out = []
    for line in open(VALUES, encoding="utf-8"):
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if set(text) <= set("-"):
                comment = []
            else:
                comment.append(text)
            continue
        m = re.match(r"^( *)([A-Za-z0-9_.-]+):(.*)$", line.rstrip("\n"))
        if not m or stripped.startswith("- "):
            comment = []
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        comment_text = " ".join(comment).replace("|", "\\|")
        comment = []
        parent = lookup(values, path[:-1]) if len(path) > 1 else values
        if not isinstance(parent, dict):
            continue  # a field of a list item: the list's row shows it
        out.append((".".join(path), default_of(parent.get(key)), comment_text))
    return out


def render():
    lines = [HEADER]
    for path, default, text in rows():
        lines.append(f"| `{path}` | {default} | {text} |\n")
    return "".join(lines)


def main(argv):
    text = render()
    if "--check" in argv:
        current = open(README, encoding="utf-8").read() if os.path.exists(README) else ""
        if current != text:
            print("helm/wsfleet/README.md is stale: run scripts/chart-readme.py", file=sys.stderr)
            return 1
        return 0
    with open(README, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
