"""The Fashion-MNIST importer: real Debian files, and hand-made IDX files for the error cases."""

from __future__ import annotations

import argparse
import gzip
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from PIL import Image

from ladder_siam.prep.fashion_mnist import (
    CLASS_NAMES,
    DEBIAN_PACKAGE,
    DEFAULT_SOURCE_DIR,
    IdxFormatError,
    get_args_parser,
    import_fashion_mnist,
    main,
)

LIMIT = 20


def parse_idx(path: Path, header_bytes: int) -> np.ndarray:
    """An independent IDX reader: skips the header and keeps the raw bytes."""
    return np.frombuffer(gzip.decompress(path.read_bytes())[header_bytes:], dtype=np.uint8)


def write_idx(path: Path, magic: int, array: np.ndarray, declared: tuple[int, ...]) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in declared)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_source(folder: Path, images: int = 3) -> Path:
    """A source folder of tiny, well-formed Fashion-MNIST files."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        pixels = rng.integers(0, 256, (images, 28, 28))
        labels = np.arange(images) % len(CLASS_NAMES)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, pixels, (images, 28, 28))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x801, labels, (images,))
    return folder


def test_limited_import_matches_the_idx_arrays(tmp_path: Path) -> None:
    require_tool(f"{DEFAULT_SOURCE_DIR}/train-images-idx3-ubyte.gz")
    summary = import_fashion_mnist(str(tmp_path), limit=LIMIT)
    assert (summary.train_images, summary.val_images) == (LIMIT, LIMIT)
    source = Path(DEFAULT_SOURCE_DIR)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = parse_idx(source / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = parse_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 8)
        pngs = sorted((tmp_path / split).glob("*/*.png"), key=lambda path: path.stem)
        assert [path.stem for path in pngs] == [f"{index:05d}" for index in range(LIMIT)]
        for index, path in enumerate(pngs):
            assert path.parent.name == CLASS_NAMES[labels[index]]
            with Image.open(path) as png:
                assert png.mode == "L"
                assert np.array_equal(np.array(png), images[index])
    readme = (tmp_path / "README.md").read_text()
    assert "Zalando SE" in readme
    assert DEBIAN_PACKAGE in readme


def test_imports_every_image_without_limit(tmp_path: Path) -> None:
    source = fake_source(tmp_path / "source", images=3)
    summary = import_fashion_mnist(str(tmp_path / "out"), source_dir=str(source))
    assert (summary.train_images, summary.val_images) == (3, 3)
    written = sorted(path.relative_to(tmp_path / "out") for path in tmp_path.glob("out/*/*/*"))
    assert [path.as_posix() for path in written] == [
        "train/Pullover/00002.png",
        "train/T-shirt_top/00000.png",
        "train/Trouser/00001.png",
        "val/Pullover/00002.png",
        "val/T-shirt_top/00000.png",
        "val/Trouser/00001.png",
    ]


def test_bad_magic_number_names_the_file(tmp_path: Path) -> None:
    source = fake_source(tmp_path / "source")
    bad = source / "t10k-labels-idx1-ubyte.gz"
    write_idx(bad, 0x803, np.zeros(3), (3,))
    with pytest.raises(
        IdxFormatError, match=f"{re.escape(str(bad))}: magic number 0x00000803, expected 0x00000801"
    ):
        import_fashion_mnist(str(tmp_path / "out"), source_dir=str(source))


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    source = fake_source(tmp_path / "source")
    bad = source / "train-images-idx3-ubyte.gz"
    write_idx(bad, 0x803, np.zeros((2, 28, 28)), (3, 28, 28))
    with pytest.raises(
        IdxFormatError, match=f"{re.escape(str(bad))}: data ends after 1568 of 2352 bytes"
    ):
        import_fashion_mnist(str(tmp_path / "out"), source_dir=str(source))


def test_file_that_is_not_gzip_names_the_file(tmp_path: Path) -> None:
    source = fake_source(tmp_path / "source")
    bad = source / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"\x00\x00\x08\x01 plain bytes")
    with pytest.raises(IdxFormatError, match=f"{re.escape(str(bad))}: not a readable gzip file"):
        import_fashion_mnist(str(tmp_path / "out"), source_dir=str(source))


def test_wrong_image_size_is_rejected(tmp_path: Path) -> None:
    source = fake_source(tmp_path / "source")
    bad = source / "train-images-idx3-ubyte.gz"
    write_idx(bad, 0x803, np.zeros((3, 32, 32)), (3, 32, 32))
    with pytest.raises(IdxFormatError, match=r"\(32, 32\) pixels, expected \(28, 28\)"):
        import_fashion_mnist(str(tmp_path / "out"), source_dir=str(source))


def test_missing_source_says_what_to_install(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(missing))}/train-images.*{DEBIAN_PACKAGE}"
    ):
        import_fashion_mnist(str(tmp_path / "out"), source_dir=str(missing))
    assert not (tmp_path / "out").exists()


def test_cli_options_reach_the_importer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = fake_source(tmp_path / "source", images=4)
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    defaults = parser.parse_args(["--dest", str(tmp_path / "out")])
    assert (defaults.source_dir, defaults.limit) == (DEFAULT_SOURCE_DIR, None)
    args = parser.parse_args(
        ["--dest", str(tmp_path / "out"), "--source-dir", str(source), "--limit", "2"]
    )
    with caplog.at_level(logging.INFO, logger="ladder_siam.prep.fashion_mnist"):
        main(args)
    assert "imported 2 train and 2 val" in caplog.text
