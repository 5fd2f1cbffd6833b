"""HF checkpoints on disk: the packed format byte for byte, latent and legacy forms, mmap, round trips."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pybitnet
from conftest import mapped_ranges, rel_err
from pybitnet.formats.hf import save_hf_model, summarize_hf
from pybitnet.models import ModelConfig
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_latent_model, random_model
from pybitnet.nn import BitLinear, PackedBitLinear
from pybitnet.quant.layouts.hf import unpack_rows


def _ids(length=9, seed=0):
    return torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(seed))


def test_packed_file_holds_the_hub_layout(dummy_dir):
    """uint8 [out/4, in] weights and a [1] weight_scale per linear; its direction follows linear_class."""
    for name, multiplies in (("tiny-bitnet", True), ("tiny-llama", False)):
        path = dummy_dir(name)
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "bitnet"
        assert cfg["quantization_config"]["linear_class"] == ("autobitlinear" if multiplies else "bitlinear")
        tensors = load_file(path / "model.safetensors")
        w, s = (
            tensors["model.layers.1.mlp.gate_proj.weight"],
            tensors["model.layers.1.mlp.gate_proj.weight_scale"],
        )
        out, cols = cfg["intermediate_size"], cfg["hidden_size"]
        assert w.dtype == torch.uint8 and w.shape == (out // 4, cols) and s.shape == (1,)
        model = pybitnet.load_model(path, kernel="reference")
        tw = model.layers[1].mlp.gate_proj.ternary()
        assert torch.equal(unpack_rows(w, out), tw.codes)
        stored = s.item() if multiplies else 1 / s.item()
        assert stored == pytest.approx(tw.scale.item(), rel=1e-6)
        assert ("lm_head.weight" in tensors) == (not cfg["tie_word_embeddings"])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_loaded_weights_are_views_of_the_memory_mapped_file(dummy_dir):
    """No copy: packed weights and same-dtype float tensors point into the file's mapping."""
    path = dummy_dir("tiny-bitnet", dtype=torch.bfloat16)
    model = pybitnet.load_model(path, dtype=torch.bfloat16, kernel="reference")
    ranges = mapped_ranges(path / "model.safetensors")
    assert ranges

    def mapped(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in ranges)

    packed = [m.packed for m in model.modules() if isinstance(m, PackedBitLinear)]
    assert packed and all(mapped(p) for p in packed)
    assert mapped(model.embed_tokens.weight) and mapped(model.layers[0].input_layernorm.weight)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_cpu_kernel_load_keeps_16bit_embeddings_mapped(dummy_dir):
    """A float32 model on the C kernels (int8 head) keeps a bf16 embedding table as stored, a view of the
    mapped file instead of a float32 copy; its logits equal those with the table widened at load."""
    from pybitnet.kernels import cpu

    if not cpu.native_available():
        pytest.skip("the C kernels are not built")
    path = dummy_dir("tiny-bitnet", dtype=torch.bfloat16)
    model = pybitnet.load_model(path, dtype=torch.float32, kernel="cpu")
    emb = model.embed_tokens.weight
    ranges = mapped_ranges(path / "model.safetensors")
    assert emb.dtype == torch.bfloat16 and any(lo <= emb.data_ptr() < hi for lo, hi in ranges)
    assert model.dtype == model.compute_dtype == torch.float32
    ids = _ids()
    got = model(ids)
    model.embed_tokens.weight = torch.nn.Parameter(emb.float(), requires_grad=False)
    assert got.dtype == torch.float32 and torch.equal(got, model(ids))
    reference = pybitnet.load_model(path, dtype=torch.float32, kernel="reference")
    assert reference.embed_tokens.weight.dtype == torch.float32  # other kernels read the table as a head


def _resident_bytes_of_mapping(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.endswith(str(path.resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _smaps_field(address: int, field: str) -> str | None:
    """`field` of the mapping of this process that holds `address` (/proc/self/smaps), None if absent."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and len(line.split()) >= 5:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def test_streamed_copies_are_exact_aligned_and_disjoint(monkeypatch):
    from pybitnet.formats.memory import HUGEPAGES_ENV, streamed_copy

    g = torch.Generator().manual_seed(0)
    for env in ("1", "0"):
        monkeypatch.setenv(HUGEPAGES_ENV, env)
        big = torch.randint(0, 256, (20 << 20,), generator=g, dtype=torch.uint8)  # a mapping of its own
        sources = [torch.randn(7, 9, generator=g).t(), torch.randint(-9, 9, (3, 1000), dtype=torch.int8), big]
        copies = [streamed_copy(t) for t in sources]
        for t, c in zip(sources, copies, strict=True):
            assert c.is_contiguous() and c.dtype == t.dtype and torch.equal(c, t)
            assert c.data_ptr() % 64 == 0
        spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        copies[1].fill_(0)  # writable, and only its own bytes
        assert torch.equal(copies[0], sources[0]) and torch.equal(copies[2], big)


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="needs Linux transparent huge pages")
def test_streamed_memory_is_returned_when_its_tensors_are_gone(monkeypatch):
    """The arena forgets its current chunk once nothing carved from it is alive, so a deleted model's
    weights leave no mapping behind."""
    import gc

    from pybitnet.formats import memory

    monkeypatch.setenv(memory.HUGEPAGES_ENV, "1")
    monkeypatch.setattr(memory, "_ARENA", memory._StreamedArena())
    copies = [memory.streamed_copy(torch.full((1000,), i, dtype=torch.int16)) for i in range(3)]
    chunk = memory._ARENA.chunk.data_ptr()
    assert _smaps_field(copies[0].data_ptr(), "THPeligible") == "1"
    view = copies[1][10:20]  # a view keeps its storage, not the arena's hold on the chunk
    del copies
    gc.collect()
    assert memory._ARENA.chunk is None
    assert torch.equal(view, torch.ones(10, dtype=torch.int16))
    del view
    gc.collect()
    if _thp_mode() == "madvise":  # then only advised mappings are eligible: none is left at the chunk
        assert _smaps_field(chunk, "THPeligible") != "1"


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="needs Linux transparent huge pages")
def test_cpu_kernel_weights_lie_in_huge_page_memory(dummy_dir, monkeypatch):
    """Loaded for the C kernels, the packed ternary weights and the int8 head lie in memory advised for
    transparent huge pages (the kernels stream them every token); with $PYBITNET_HUGEPAGES=0 they do not."""
    from pybitnet.formats.memory import HUGEPAGES_ENV
    from pybitnet.kernels import cpu

    if not cpu.native_available():
        pytest.skip("the C kernels are not built")
    path = dummy_dir("tiny-bitnet")
    for env, want in (("1", "1"), ("0", "0")):
        monkeypatch.setenv(HUGEPAGES_ENV, env)
        model = pybitnet.load_model(path, kernel="cpu")
        weights = [m.packed.data for m in model.modules() if isinstance(m, PackedBitLinear)]
        head = model.int8_head()
        assert weights and head is not None
        if _thp_mode() == "always" and want == "0":
            continue  # every anonymous mapping is eligible then
        for t in [*weights, head.q]:
            assert _smaps_field(t.data_ptr(), "THPeligible") == want


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc (Linux)")
def test_random_read_advice_makes_only_looked_up_rows_resident(tmp_path):
    """Rows looked up in an advised mapped table (embeddings) make their own pages resident, not the
    read-ahead around each one: 32 rows of 4 KiB spread over 64 MiB."""
    from pybitnet.formats.memory import advise_random_reads

    path = tmp_path / "table.safetensors"
    save_file({"table": torch.ones(16384, 1024)}, str(path))  # 64 MiB, one 4 KiB page a row
    # as after a reboot: none of the file in the page cache (a just-written file's cached pages can be large
    # folios, which a fault maps whole, advice or not)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    with safe_open(str(path), framework="pt") as f:
        table = f.get_tensor("table")
    advise_random_reads(table)
    rows = torch.arange(0, 16384, 512)
    assert table[rows].sum().item() == 32 * 1024
    # at most the fault-around window of older kernels (16 pages) per row; read-ahead would map far more
    assert _resident_bytes_of_mapping(path) <= 32 * 64 * 1024


@pytest.mark.parametrize(("name", "tol"), [("tiny-bitnet", 0.0), ("tiny-llama", 1e-6)])
def test_save_load_round_trip(tmp_path, name, tol):
    """Exact where weight_scale multiplies; within float32 rounding of 1/(1/s) where it divides."""
    model = random_model(preset(name, num_hidden_layers=1), seed=3, kernel="reference")
    save_hf_model(model, tmp_path)
    loaded = pybitnet.load_model(tmp_path, kernel="reference")
    assert loaded.config.to_dict() == model.config.to_dict()
    assert rel_err(loaded(_ids()), model(_ids())) <= tol


def test_out_features_not_a_multiple_of_4_round_trip(tmp_path):
    """transformers' BitLinear cannot hold these (it floors out/4), but the layout and pybitnet can."""
    config = preset(
        "tiny-bitnet", num_hidden_layers=1, intermediate_size=350, num_key_value_heads=1, head_dim=34
    )
    model = random_model(config, seed=4, kernel="reference")
    save_hf_model(model, tmp_path)
    w = load_file(tmp_path / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert w.shape == (88, 128)  # ceil(350 / 4)
    assert rel_err(pybitnet.load_model(tmp_path, kernel="reference")(_ids()), model(_ids())) == 0.0


def test_latent_checkpoint_round_trip(tmp_path):
    """A training-form model saves its float master weights with a config that quantizes online; loading
    ternarizes them with the absmean rule, which equals converting each layer with to_packed."""
    model = random_latent_model(preset("tiny-bitnet", num_hidden_layers=1), seed=5)
    save_hf_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_mode"] == "online"
    assert cfg["quantization_config"]["linear_class"] == "autobitlinear"
    w = load_file(tmp_path / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.float32 and "model.layers.0.self_attn.q_proj.weight_scale" not in load_file(
        tmp_path / "model.safetensors"
    )
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            model.set_submodule(name, module.to_packed("reference"))
    with torch.no_grad():
        expected = model(_ids())
    assert rel_err(pybitnet.load_model(tmp_path, kernel="reference")(_ids()), expected) <= 1e-6


def test_legacy_dummy_is_a_1bitllm_checkpoint(dummy_dir):
    path = dummy_dir("tiny-legacy")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["BitnetForCausalLM"] and cfg["model_type"] == "llama"
    assert "quantization_config" not in cfg and cfg["hidden_act"] == "silu"
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F32"
    assert "model.layers.1.self_attn.inner_attn_ln.weight" in names
    assert "model.layers.1.mlp.ffn_layernorm.weight" in names
    assert not any("sub_norm" in n or n.endswith("weight_scale") for n in names)
    assert ModelConfig.from_hf(cfg).family == "legacy"


def test_mixed_forms_are_refused(tmp_path):
    from pybitnet.errors import WeightsError

    model = random_latent_model(preset("tiny-bitnet", num_hidden_layers=1))
    model.layers[0].mlp.up_proj = model.layers[0].mlp.up_proj.to_packed("reference")
    with pytest.raises(WeightsError, match="mixes packed and training-form"):
        save_hf_model(model, tmp_path)


def test_tokenizer_files_travel_with_a_save(dummy_dir, tmp_path):
    src = dummy_dir("tiny-bitnet")
    save_hf_model(pybitnet.load_model(src), tmp_path, tokenizer_dir=src)
    for fname in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (tmp_path / fname).read_bytes() == (src / fname).read_bytes()


def test_bf16_load_is_close_to_fp32(dummy_dir):
    path = dummy_dir("tiny-bitnet", dtype=torch.bfloat16)
    fp32 = pybitnet.load_model(path, kernel="reference")
    bf16 = pybitnet.load_model(path, dtype=torch.bfloat16, kernel="reference")
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert rel_err(bf16(_ids()), fp32(_ids())) < 0.05


def test_summary_reads_headers_only(dummy_dir):
    s = summarize_hf(dummy_dir("tiny-llama"))
    c = s.config
    per_layer = (
        2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * 64 + 3 * c.hidden_size * c.intermediate_size
    )
    assert s.ternary_params == c.num_hidden_layers * per_layer
    assert s.float_params == 2 * c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size
    assert s.ternary_bits_per_weight == 2.0
    assert "weight_scale divides (bitlinear)" in s.layout
    assert s.weight_bytes == (dummy_dir("tiny-llama") / "model.safetensors").stat().st_size


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_private_reads_equal_mapped_views_but_are_not_mapped(dummy_dir):
    from pybitnet.formats.safetensors_io import TensorReader

    path = dummy_dir("tiny-bitnet", dtype=torch.bfloat16)
    reader = TensorReader(path)
    for name in reader.names():
        mapped, private = reader.get(name), reader.read(name)
        assert private.dtype == mapped.dtype and torch.equal(private, mapped), name
    ranges = mapped_ranges(path / "model.safetensors")
    private = reader.read("model.embed_tokens.weight")
    assert not any(lo <= private.data_ptr() < hi for lo, hi in ranges)


def test_row_reads_equal_slices_of_the_mapped_tensor(dummy_dir):
    from pybitnet.formats.safetensors_io import TensorReader

    reader = TensorReader(dummy_dir("tiny-bitnet", dtype=torch.bfloat16))
    name = "model.embed_tokens.weight"
    mapped = reader.get(name)
    for start, stop in ((0, None), (0, 1), (5, 77), (500, 10_000), (10_000, None)):
        rows = reader.read_rows(name, start, stop)
        assert rows.dtype == mapped.dtype and torch.equal(rows, mapped[start:stop]), (start, stop)


@pytest.mark.parametrize(
    ("name", "dtype"), [("tiny-bitnet", torch.bfloat16), ("tiny-bitnet", torch.float32), ("tiny-llama", None)]
)
def test_cpu_kernel_load_builds_the_int8_head_from_file_rows(dummy_dir, monkeypatch, name, dtype):
    """The head made at load (from rows read with file I/O) equals the one made from the loaded weight."""
    from pybitnet.kernels import cpu
    from pybitnet.kernels.cpu_head import Int8Head
    from pybitnet.models.transformer import HEAD_ENV

    if not cpu.native_available():
        pytest.skip("the C kernels are not built")
    monkeypatch.delenv(HEAD_ENV, raising=False)
    path = dummy_dir(name, dtype=torch.bfloat16)
    model = pybitnet.load_model(path, dtype=dtype or torch.float32, kernel="cpu")
    assert model.config.tie_word_embeddings == (name == "tiny-bitnet")  # tied and untied heads
    head = model.lm_head_int8
    assert head is not None
    want = Int8Head.from_float(model.lm_head.weight)
    assert torch.equal(head.q, want.q) and torch.equal(head.scale, want.scale)
    assert model.int8_head() is head
    assert pybitnet.load_model(path, kernel="reference").lm_head_int8 is None
