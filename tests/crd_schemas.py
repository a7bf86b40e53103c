"""The upstream CRD schemas in ``tests/schemas/`` (see its SOURCES.md), as strict validators.

Every Kubernetes object the project sends or ships is checked against the schema the API
server would check it against, with unknown fields refused as strict field validation does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).parent / "schemas"


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of every served version of every CRD here."""
    schemas = {}
    for path in sorted(SCHEMAS.rglob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if document.get("kind") != "CustomResourceDefinition":
            continue  # an example object shipped beside the CRDs, not a schema
        spec = document["spec"]
        for version in spec["versions"]:
            api_version = f"{spec['group']}/{version['name']}"
            schemas[api_version, spec["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def no_unknown_fields(schema: Any) -> Any:
    """The schema with unknown fields refused, as the API server's strict field validation does
    (structural CRD schemas otherwise let a misspelt field through, to be pruned silently)."""
    if isinstance(schema, list):
        return [no_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: no_unknown_fields(value) for key, value in schema.items()}
    if "properties" in schema and "x-kubernetes-preserve-unknown-fields" not in schema:
        strict.setdefault("additionalProperties", False)
    return strict


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every way ``obj`` breaks its CRD's schema, as ``path: message`` lines (empty if valid).

    Raises:
        KeyError: No CRD here defines the object's apiVersion and kind.
    """
    schema = crd_schemas()[obj["apiVersion"], obj["kind"]]
    # OpenAPI v3 schemas are draft 4 JSON Schema at heart; not check_schema(): their patterns
    # are Go regular expressions, some of which Python's re refuses.
    validator = jsonschema.Draft4Validator(no_unknown_fields(schema))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
