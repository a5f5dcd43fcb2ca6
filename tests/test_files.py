"""hata_jax.files.write_atomically: a file is written whole or not at all."""
from __future__ import annotations

import threading

import pytest

from hata_jax.files import write_atomically


def test_writes_the_file_and_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    write_atomically(path, lambda f: f.write(b"abc"))
    assert path.read_bytes() == b"abc"
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_concurrent_writers_never_mix(tmp_path):
    """Writers started together (each writing its byte in many small pieces) leave one writer's
    whole file."""
    path = tmp_path / "x.bin"
    start = threading.Barrier(8)

    def writer(byte: bytes):
        start.wait()
        write_atomically(path, lambda f: [f.write(byte * 1000) for _ in range(200)])

    threads = [threading.Thread(target=writer, args=(bytes([65 + i]),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = path.read_bytes()
    assert len(data) == 200_000 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
