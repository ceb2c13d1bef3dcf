"""The lean GGUF header reader agrees with the `gguf` package on every field and tensor."""

import gguf
import numpy as np
import pytest

from slimserve.loader.gguf_file import GGUFFile, GGUFFormatError


def assert_same_as_gguf(path):
    ours, ref = GGUFFile(str(path)), gguf.GGUFReader(str(path))
    # The reference lists the header's counts as pseudo-fields "GGUF.*"; ours keeps only keys.
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.keys()) == keys
    for key in keys:
        field = ref.fields[key]
        assert ours.meta(key) == field.contents(), key
        assert ours.types[key] == field.types[0].value, key
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours.count(key) == len(field.data), key
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.shape, t.type_name) == (r.name, tuple(map(int, r.shape)),
                                                  r.tensor_type.name)  # fmt: skip
        assert (t.offset, t.n_bytes) == (r.data_offset, r.n_bytes)
        assert np.array_equal(ours.read(t), np.asarray(r.data).view(np.uint8).reshape(-1))


def test_the_default_model_matches_gguf(gguf_path):
    assert_same_as_gguf(gguf_path)


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_type_and_both_byte_orders(tmp_path, endian):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 1 << 60)
    w.add_int64("t.i64", -(1 << 60))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_array("t.strs", ["a", "", "ünï", "<|im_end|>"] * 1000)
    w.add_array("t.none", [])
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(7, dtype=np.float16))
    w.add_tensor("c", np.ones((2, 3, 5), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf(path)
    f = GGUFFile(str(path))
    assert f.data_offset % 64 == 0 and f.meta("t.str") == "héllo ✓"


def test_garbled_headers_are_format_errors(tmp_path, gguf_path):
    with open(gguf_path, "rb") as f:
        head = f.read(1 << 16)
    cases = {
        "short": head[:10],
        "cut in the vocabulary": head,
        "bad version": head[:4] + (9).to_bytes(4, "little") + head[8:],
        "bad magic": b"GGUX" + head[4:],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(GGUFFormatError):
            GGUFFile(str(p))
