"""Storage: a local path or a pyarrow filesystem URI, opened with one-line errors, and copies
between it and this machine's disk (S3 itself: test_s3)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from trainable.errors import UserError
from trainable.storage import LOCAL, copy_file, local_dir, open_uri, replace_file


def test_a_local_path_opens_as_itself_made_absolute(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = open_uri("runs/a")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "runs" / "a")


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://bucket/runs?endpoint_override=x", "s3://bucket/runs?endpoint_override=x: options "
     "in a storage URI (?...) are not supported; point at an S3-compatible endpoint with the "
     "environment variable AWS_ENDPOINT_URL"),
    ("nosuch://bucket/runs", "nosuch://bucket/runs: cannot open storage ("),
])
def test_a_storage_uri_that_cannot_be_opened_is_one_line_naming_it(uri: str,
                                                                   expected: str) -> None:
    with pytest.raises(UserError) as err:
        open_uri(uri)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"^{uri.split('?')[0]}"), local_dir(uri):
        pass


def test_a_missing_local_directory_is_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    with pytest.raises(UserError, match=f"^{missing}: no such directory$"), local_dir(missing):
        pass


def test_copy_links_only_when_asked(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"decoded")
    copy_file(LOCAL, str(source), LOCAL, str(tmp_path / "linked"), link=True)
    copy_file(LOCAL, str(source), LOCAL, str(tmp_path / "copied"))
    assert (tmp_path / "linked").samefile(source)
    assert not (tmp_path / "copied").samefile(source)
    assert (tmp_path / "copied").read_bytes() == b"decoded"


def test_replace_file_creates_the_directory_and_leaves_no_hidden_copy(tmp_path: Path) -> None:
    source = tmp_path / "journal"
    for text in (b"one\n", b"one\ntwo\n"):
        source.write_bytes(text)
        replace_file(LOCAL, str(source), LOCAL, str(tmp_path / "run" / "study.journal"))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["study.journal"]
    assert (tmp_path / "run" / "study.journal").read_bytes() == b"one\ntwo\n"
