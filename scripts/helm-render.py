#!/usr/bin/env python3
"""Renders the chart with the real Helm engine (PyPI helm-python-sdk) and
prints every manifest as JSON, for the Rust tests (tests/helm_chart.rs).

    helm-render.py chart <chart-dir> <values-json> [release] [namespace]
        -> {"<template path>": [<object>, ...], ...}
    helm-render.py yaml <file.yaml>...
        -> {"<file>": [<object>, ...], ...}
    helm-render.py lint <chart-dir> <values-json>
        -> helm lint --strict's report: {"messages": [{"severity", "path",
           "error"}], "errors": [...]} (severity 1 info, 2 warning, 3 error)

A render error prints {"error": "..."} and exits 2.
"""
import json
import sys

import yaml


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def main(argv):
    if argv[1] == "yaml":
        out = {}
        for path in argv[2:]:
            with open(path, encoding="utf-8") as f:
                out[path] = docs(f.read())
        print(json.dumps(out))
        return 0
    import helm_python

    if argv[1] == "lint":
        report = helm_python.lint(argv[2], json.loads(argv[3]), strict=True, namespace="fleet")
        print(json.dumps(report))
        return 0
    chart_dir, values = argv[2], json.loads(argv[3])
    release = argv[4] if len(argv) > 4 else "wsfleet"
    namespace = argv[5] if len(argv) > 5 else "fleet"
    chart = helm_python.Chart.load(chart_dir)
    try:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps({path: docs(text) for path, text in rendered.items() if path.endswith(".yaml")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
