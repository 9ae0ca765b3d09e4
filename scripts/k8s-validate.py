#!/usr/bin/env python3
"""Validates Kubernetes objects against the Kubernetes OpenAPI schemas
(PyPI kubernetes-validate, strict: unknown fields are errors), for the Rust
tests (tests/k8s_schemas.rs).

    k8s-validate.py <kubernetes version>   < [<object>, ...] (JSON)
        -> {"valid": n, "invalid": [{"kind", "name", "error", "path"}],
            "no_schema": ["<apiVersion>/<kind>", ...]}

Kinds the package has no schema for (custom resources such as
ServiceMonitor or ScaledObject) are listed under no_schema, not passed.
"""
import json
import sys

import kubernetes_validate as kv


def main(argv):
    version = argv[1]
    objects = json.load(sys.stdin)
    report = {"valid": 0, "invalid": [], "no_schema": []}
    for obj in objects:
        try:
            kv.validate(obj, version, strict=True)
            report["valid"] += 1
        except kv.SchemaNotFoundError:
            report["no_schema"].append(f"{obj.get('apiVersion')}/{obj.get('kind')}")
        except kv.ValidationError as e:
            report["invalid"].append({
                "kind": obj.get("kind"),
                "name": (obj.get("metadata") or {}).get("name"),
                "error": e.message,
                "path": [str(p) for p in e.path],
            })
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
