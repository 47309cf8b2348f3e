"""Calibration and evaluation text is decoded strictly (item 9 of issue 11): binary files and bytes invalid in the
encoding are refused with the file and byte offset, never turned into U+FFFD silently."""
from __future__ import annotations

import os

import pytest

from pyprune.data import NotTextError, load_text, read_text_file

TEXT = "Café au lait, naïve façade — «déjà vu».\nSecond line.\n"


def test_utf8_text_is_read_exactly(tmp_path):
    path = tmp_path / "utf8.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    assert load_text(str(path)) == TEXT
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(TEXT.replace("\n", "\r\n").encode("utf-8"))
    assert load_text(str(crlf)) == TEXT  # universal newlines, as before
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + TEXT.encode("utf-8"))
    assert load_text(str(bom)) == "\ufeff" + TEXT  # kept, as before: results on such files do not change


def test_latin1_text_is_refused_unless_its_encoding_is_given(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(TEXT.encode("latin-1", errors="replace"))
    offset = TEXT.index("é")
    with pytest.raises(NotTextError, match=rf"latin1\.txt.*not valid utf-8 text: byte 0xe9 at offset {offset}") as e:
        load_text(str(path))
    assert "encoding='latin-1'" in str(e.value) and "iconv" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI reports it as bad input (exit status 2)
    assert load_text(str(path), encoding="latin-1") == TEXT.encode("latin-1", errors="replace").decode("latin-1")
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        load_text(str(path), encoding="klingon")


def test_binary_files_are_refused(tmp_path):
    binary = "/bin/ls" if os.path.isfile("/bin/ls") else None
    if binary is None:
        binary = str(tmp_path / "prog")
        open(binary, "wb").write(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    for encoding in ("utf-8", "latin-1"):  # even where every byte decodes
        with pytest.raises(NotTextError, match=r"not a text file: it has a NUL byte at offset \d+"):
            load_text(binary, encoding=encoding)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(TEXT.encode("utf-16"))
    with pytest.raises(NotTextError, match=r"utf16\.txt.*NUL byte.*UTF-16"):
        read_text_file(str(utf16))
