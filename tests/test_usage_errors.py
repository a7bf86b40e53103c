"""User errors are a type: one line and exit 2 for a user's mistake, a traceback for a bug."""

from __future__ import annotations

from pathlib import Path

import pytest

from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import ManifestError
from ladder_siam.data.shards import ShardIntegrityError
from ladder_siam.errors import UsageError
from ladder_siam.prep import demo_data
from ladder_siam.prep.annotation_files import AnnotationFileError
from ladder_siam.prep.fashion_mnist import IdxFormatError


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


def test_a_users_mistake_is_one_line_and_exit_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo-data", "--dest", str(tmp_path / "demo"), "--images", "0"]
    assert cli(argv) == 2
    (line,) = _errors(caplog)
    assert line == "demo-data: images must be at least 1, got 0"
    assert "Traceback" not in capsys.readouterr().err


def test_a_failed_read_is_one_line_and_exit_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["prepare-shards", "--source", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "d")]
    assert cli(argv) == 2
    (line,) = _errors(caplog)
    assert "nowhere: no such directory" in line


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch raises ValueError on a shape mismatch: that is a bug, not bad input."""

    def shape_mismatch(*args: object, **kwargs: object) -> None:
        raise ValueError("Expected input batch_size (4) to match target batch_size (3).")

    monkeypatch.setattr(demo_data, "make_demo_data", shape_mismatch)
    with pytest.raises(ValueError, match="batch_size"):
        cli(["demo-data", "--dest", str(tmp_path / "demo"), "--images", "8"])


@pytest.mark.parametrize(
    "error", [ManifestError, AnnotationFileError, IdxFormatError, ShardIntegrityError]
)
def test_every_error_about_a_users_input_is_a_usage_error(error: type[Exception]) -> None:
    assert issubclass(error, UsageError)
