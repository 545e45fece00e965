"""`server.models.gguf_file.GGUFFile` reads what gguf-py's reader reads: every metadata value
and every tensor of the default model and of files written by gguf-py's writer, and it
refuses broken files with an error that names them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from server.models.gguf_file import GGUFFile, GGUFFormatError
from server.models.loader import default_model_path


def _same_as_gguf_py(path: Path) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert keys and set(keys) == set(ours._values)
    for key in keys:
        assert ours.get(key) == theirs.fields[key].contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(map(int, b.shape)))
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name
    return ours


def test_default_model_reads_as_gguf_py_reads_it():
    model = _same_as_gguf_py(default_model_path())
    assert model.get("general.architecture") == "llama"
    assert len(model.get("tokenizer.ggml.tokens")) == 49152
    assert model.get("no.such.key", 7) == 7


@pytest.mark.parametrize("alignment", [None, 64])
def test_written_file_reads_as_gguf_py_reads_it(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_string("s", "héllo")
    writer.add_bool("b", True)
    writer.add_float64("f64", 0.1)
    writer.add_int64("i64", -5)
    writer.add_array("strings", ["a", "", "ccc"])
    writer.add_array("ints", [1, 2, 3])
    writer.add_array("floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 7)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = _same_as_gguf_py(path)
    assert ours.get("strings") == ["a", "", "ccc"] and ours.get("s") == "héllo"
    q = next(t for t in ours.tensors if t.name == "q8")
    assert q.shape == (64, 4) and q.data.shape == (4, 68)  # two 34-byte blocks a row


def test_broken_files_are_refused_by_name(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFFormatError, match="model.gguf is not a GGUF file"):
        GGUFFile(not_gguf)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty.gguf is not a GGUF file"):
        GGUFFile(empty)
    data = default_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:300_000])  # cut in the vocabulary
    with pytest.raises(GGUFFormatError, match="cut.gguf: truncated or corrupt GGUF header"):
        GGUFFile(cut)
    no_data = tmp_path / "no_data.gguf"
    no_data.write_bytes(data[:4_000_000])  # every header, the tensors cut short
    with pytest.raises(GGUFFormatError, match="runs past the end of the file"):
        GGUFFile(no_data)
