"""The vendored CRD schemas are the upstream files SOURCES.md names, byte for byte."""

from __future__ import annotations

import hashlib
import re

from crd_schemas import SCHEMAS, crd_schemas

# A table row of SOURCES.md: the file in backquotes first, its sha256 in backquotes last.
ROW = re.compile(r"^\| `(?P<file>[^`]+\.yaml)` \|.*\| `(?P<sha256>[0-9a-f]{64})` \|$", re.M)


def test_every_schema_file_matches_its_recorded_sha256() -> None:
    recorded = {m["file"]: m["sha256"] for m in ROW.finditer((SCHEMAS / "SOURCES.md").read_text())}
    present = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.yaml")}
    assert present == set(recorded), "every schema file has one row in SOURCES.md"
    for name, sha256 in recorded.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == sha256, name


def test_the_kinds_the_project_sends_have_schemas() -> None:
    kinds = set(crd_schemas())
    assert ("kubeflow.org/v1", "PyTorchJob") in kinds
    assert ("trainer.kubeflow.org/v1alpha1", "TrainJob") in kinds
    assert ("monitoring.coreos.com/v1", "PrometheusRule") in kinds
