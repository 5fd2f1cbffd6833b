"""GGUF import: bitnet.cpp-style I2_S and float files, and damaged files that must raise typed errors."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pybitnet
from conftest import mapped_ranges
from pybitnet.errors import ConfigError, PyBitNetError, UnsupportedModelError, WeightsError
from pybitnet.formats.gguf_arch import gguf_tensor_name
from pybitnet.formats.gguf_export import convert_hf_to_gguf
from pybitnet.formats.gguf_file import I2_S, GGUFFile
from pybitnet.formats.gguf_import import load_gguf_model
from pybitnet.kernels import get_kernel
from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset
from pybitnet.nn import PackedBitLinear
from pybitnet.quant import pack

SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
REFERENCE = get_kernel("reference")


@pytest.fixture(scope="module")
def bitnet_dir(tmp_path_factory) -> Path:
    return create_dummy(preset("tiny-bitnet", **SMALL), tmp_path_factory.mktemp("bitnet"), seed=5)


@pytest.fixture(scope="module")
def tq2_file(bitnet_dir, tmp_path_factory) -> bytes:
    return convert_hf_to_gguf(bitnet_dir, tmp_path_factory.mktemp("tq") / "m.gguf").read_bytes()


def write_bitnet_cpp_file(model, path: Path, ternary: str) -> Path:
    """A file as bitnet.cpp's converter writes one: architecture bitnet-b1.58, ternary linears in I2_S (type
    36, which the gguf package cannot name, so its bytes go in as raw int8) or as F16 values, F16 embeddings,
    F32 norms, linear RoPE scaling of factor 1."""
    c = model.config
    w = GGUFWriter(path, "bitnet-b1.58")
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_string("bitnet-b1.58.rope.scaling.type", "linear")
    w.add_float32("bitnet-b1.58.rope.scaling.factor", 1.0)
    w.add_uint32("tokenizer.ggml.bos_token_id", c.bos_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", c.eos_token_id)
    for name, module in model.named_modules():
        if isinstance(module, PackedBitLinear):
            tw = module.ternary()
            if ternary == "i2s":
                data = pack(tw, "i2s").data.numpy().view(np.int8)
                w.add_tensor(gguf_tensor_name(name + ".weight"), data, raw_shape=tw.shape, raw_dtype=I2_S)
            else:
                w.add_tensor(gguf_tensor_name(name + ".weight"), tw.dequantize().numpy().astype(np.float16))
    for name, param in model.named_parameters():
        values = param.detach().float().numpy()
        w.add_tensor(gguf_tensor_name(name), values.astype(np.float16 if values.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("ternary", ["i2s", "f16"])
def test_bitnet_cpp_style_files_load_with_identical_logits(bitnet_dir, tmp_path, ternary):
    model = pybitnet.load_model(bitnet_dir, kernel="reference")
    path = write_bitnet_cpp_file(model, tmp_path / "b.gguf", ternary)
    f = GGUFFile(path)
    assert f.tensors["blk.0.attn_q.weight"].type == (I2_S if ternary == "i2s" else GGMLQuantizationType.F16)
    assert f.tensors["blk.0.attn_q.weight"].nbytes == (
        256 * 256 // 4 + 32 if ternary == "i2s" else 256 * 256 * 2
    )
    loaded = load_gguf_model(path, REFERENCE)
    assert loaded.config.family == "bitnet" and loaded.config.tie_word_embeddings
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids), model(ids))
    for ours, theirs in zip(loaded.modules(), model.modules(), strict=True):
        if isinstance(ours, PackedBitLinear):
            assert torch.equal(ours.ternary().codes, theirs.ternary().codes)


def test_cpu_kernel_keeps_16bit_embeddings_mapped_and_heads_from_file_rows(bitnet_dir, tmp_path):
    """With the C kernels (int8 head) a float32 model keeps the F16 embedding table as a view of the mapped
    file; logits and the int8 head equal those of the table widened to float32 at load."""
    from pybitnet.kernels import cpu
    from pybitnet.kernels.cpu_head import Int8Head

    if not cpu.native_available() or not Path("/proc/self/maps").exists():
        pytest.skip("needs the C kernels and /proc (Linux)")
    model = pybitnet.load_model(bitnet_dir, kernel="reference")
    path = write_bitnet_cpp_file(model, tmp_path / "b.gguf", "i2s")
    loaded = load_gguf_model(path, get_kernel("cpu"))
    emb = loaded.embed_tokens.weight
    assert emb.dtype == torch.float16
    assert any(lo <= emb.data_ptr() < hi for lo, hi in mapped_ranges(path))  # the file's mapping, no copy
    assert loaded.dtype == torch.float32
    head = loaded.lm_head_int8
    widened = emb.float()
    want = Int8Head.from_float(widened)
    assert head is not None and torch.equal(head.q, want.q) and torch.equal(head.scale, want.scale)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    got = loaded(ids)
    loaded.embed_tokens.weight = torch.nn.Parameter(widened, requires_grad=False)
    assert torch.equal(got, loaded(ids))
    # a non-finite value in the table is found at load, through file reads
    bad = bytearray(path.read_bytes())
    t = GGUFFile(path).tensors["token_embd.weight"]
    bad[t.offset : t.offset + 2] = np.array([np.inf], dtype=np.float16).tobytes()
    (tmp_path / "bad.gguf").write_bytes(bytes(bad))
    with pytest.raises(WeightsError, match="non-finite"):
        load_gguf_model(tmp_path / "bad.gguf", get_kernel("cpu"))


def test_gguf_config_round_trips(bitnet_dir, tmp_path):
    path = convert_hf_to_gguf(bitnet_dir, tmp_path / "m.gguf")
    loaded, original = pybitnet.load_model(path).config, pybitnet.load_model(bitnet_dir).config
    for key in ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
        assert getattr(loaded, key) == getattr(original, key), key
    assert loaded.num_key_value_heads == original.num_key_value_heads
    assert loaded.rope_theta == original.rope_theta and loaded.bos_token_id == original.bos_token_id
    eot = GGUFFile(path).metadata["tokenizer.ggml.eot_token_id"]
    assert loaded.eos_token_id == [original.eos_token_id, eot]  # stop on end of text and end of turn


def patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def tensor_info_at(data: bytes, name: str) -> int:
    """Byte position just after `name` in the tensor directory, where n_dims u32, dims u64, type u32 and
    offset u64 follow."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def load_bytes(data: bytes, tmp_path: Path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return load_gguf_model(path, REFERENCE)


def test_damaged_files_raise_typed_errors(tq2_file, tmp_path):
    q = tensor_info_at(tq2_file, "blk.0.attn_q.weight")
    cases = [
        (b"not a gguf file at all", WeightsError, "not a GGUF file"),
        (patched(tq2_file, 0, b"GGUX"), WeightsError, "not a GGUF file"),
        (patched(tq2_file, 4, struct.pack("<I", 1)), WeightsError, "version 1"),
        (patched(tq2_file, 4, struct.pack(">I", 3)), WeightsError, "big-endian"),
        (patched(tq2_file, 8, struct.pack("<Q", 2**40)), WeightsError, "more than it holds"),
        (tq2_file[:200], WeightsError, "more than it holds"),
        (tq2_file[:3000], WeightsError, "truncated"),
        (tq2_file[: len(tq2_file) // 2], WeightsError, "outside the file"),
        (patched(tq2_file, q + 4 + 16, struct.pack("<I", 99)), WeightsError, "GGML type 99"),
        (patched(tq2_file, q + 4 + 16 + 4, struct.pack("<Q", 2**36)), WeightsError, "outside the file"),
        (
            patched(tq2_file, q + 4, struct.pack("<Q", 100)),
            WeightsError,
            "not a multiple of TQ2_0's block size",
        ),
        (patched(tq2_file, q, struct.pack("<I", 9)), WeightsError, "9 dimensions"),
        (patched(tq2_file, q + 4 + 16, struct.pack("<I", GGMLQuantizationType.Q4_K)), WeightsError, "Q4_K"),
        (tq2_file.replace(b"bitnet-b1.58", b"bitnet-b1.59"), UnsupportedModelError, "bitnet-b1.59"),
        (
            tq2_file.replace(b"bitnet-b1.58.block_count", b"bitnet-b1.58.block_cnt__"),
            ConfigError,
            "block_count",
        ),
        (
            tq2_file.replace(b"blk.1.attn_norm.weight", b"blk.9.attn_norm.weight"),
            WeightsError,
            "blk.1.attn_norm",
        ),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=message):
            load_bytes(data, tmp_path)


def test_misaligned_and_inconsistent_tensors(tq2_file, tmp_path):
    f_path = tmp_path / "ok.gguf"
    f_path.write_bytes(tq2_file)
    down = GGUFFile(f_path).tensors["blk.0.ffn_down.weight"]  # 512 inputs: two blocks per row
    q = tensor_info_at(tq2_file, "blk.0.attn_q.weight")
    rel = struct.unpack("<Q", tq2_file[q + 24 : q + 32])[0]
    with pytest.raises(WeightsError, match="misaligned"):
        load_bytes(patched(tq2_file, q + 24, struct.pack("<Q", rel + 1)), tmp_path)
    # a block scale that differs from the rest of its row: not a ternary tensor
    with pytest.raises(WeightsError, match=r"blk\.0\.ffn_down\.weight.*different scales"):
        load_bytes(patched(tq2_file, down.offset + 64, struct.pack("<e", 0.01)), tmp_path)
    # one row scaled on its own is a per-row scale, which loads
    one_row = patched(tq2_file, down.offset + 64, struct.pack("<e", 0.01))
    rows = load_bytes(patched(one_row, down.offset + 66 + 64, struct.pack("<e", 0.01)), tmp_path)
    assert rows.layers[0].mlp.down_proj.ternary().scale.shape == (256,)
    # the metadata says 3 KV heads, the k tensor holds 2
    key = b"bitnet-b1.58.attention.head_count_kv"
    kv = tq2_file.index(key) + len(key)
    with pytest.raises((WeightsError, ConfigError)):
        load_bytes(patched(tq2_file, kv + 4, struct.pack("<I", 3)), tmp_path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, 100_000),
    flips=st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 255)), max_size=6),
)
def test_random_damage_never_escapes_as_an_untyped_error(tq2_file, tmp_path, cut, flips):
    data = bytearray(tq2_file[: len(tq2_file) - cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    with contextlib.suppress(PyBitNetError):  # loading, or a typed error; anything else fails the test
        load_bytes(bytes(data), tmp_path)
