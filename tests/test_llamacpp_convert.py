"""benchmarks/peer/llamacpp_decode.py's GGUF conversion (Q4_1 source -> F16 / Q8_0) on a tiny GGUF
written here; no llama.cpp needed."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
quants = pytest.importorskip("gguf.quants", reason="this gguf package has no gguf.quants")
if not hasattr(quants, "quantize") or not hasattr(quants, "dequantize"):
    pytest.skip("this gguf package has no gguf.quants.quantize / dequantize (needed for the conversion)",
                allow_module_level=True)

from gguf import GGMLQuantizationType as Q  # noqa: E402

from benchmarks.peer.llamacpp_decode import convert  # noqa: E402


def _tiny_gguf(path):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny")
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q4_1))
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["<a>", "b", "c d", "é"])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1])
    w.add_array("tokenizer.ggml.merges", ["b c", "c d"])
    src = {
        "blk.0.ffn_up.weight": (rng.standard_normal((8, 64)).astype(np.float32), Q.Q4_1),
        "token_embd.weight": (rng.standard_normal((4, 96)).astype(np.float32), Q.Q8_0),
        "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), Q.F32),
    }
    for name, (values, qtype) in src.items():
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


def _fields(reader):
    out = {}
    for name, f in reader.fields.items():
        if not name.startswith("GGUF."):
            out[name] = f.contents()
    return out


@pytest.mark.parametrize("target", ["F16", "Q8_0"])
def test_convert_keeps_metadata_and_values(tmp_path, target):
    src_path, dst_path = tmp_path / "tiny.Q4_1.gguf", tmp_path / f"tiny.{target}.gguf"
    _tiny_gguf(src_path)
    done = convert(src_path, dst_path, target)
    assert done["blk.0.ffn_up.weight"] == ("Q4_1", target)
    assert done["blk.0.attn_norm.weight"] == ("F32", "F32")
    assert done["token_embd.weight"] == ("Q8_0", target)

    src, dst = gguf.GGUFReader(str(src_path)), gguf.GGUFReader(str(dst_path))
    src_kv, dst_kv = _fields(src), _fields(dst)
    assert dst_kv.pop("general.file_type") == int(getattr(gguf.LlamaFileType, f"MOSTLY_{target}"))
    src_kv.pop("general.file_type")
    assert dst_kv == src_kv  # every other key/value, tokenizer included, unchanged

    tensors = {t.name: t for t in dst.tensors}
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for t in src.tensors:
        out = tensors[t.name]
        assert list(out.shape) == list(t.shape)
        before = gguf.quants.dequantize(np.asarray(t.data), Q(t.tensor_type))
        after = gguf.quants.dequantize(np.asarray(out.data), Q(out.tensor_type))
        assert after.shape == before.shape
        if Q(t.tensor_type) == Q.F32:
            assert Q(out.tensor_type) == Q.F32
            np.testing.assert_array_equal(after, before)
            continue
        assert Q(out.tensor_type) == Q[target]
        # within Q8_0's error: half a step (block absmax / 127 / 2), plus the fp16 scale's rounding
        blocks = before.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(after - before).reshape(-1, 32)
        assert (err <= 0.5 * step + 2e-3 * np.abs(blocks) + 1e-6).all(), err.max()
        if target == "F16":
            np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-6)
