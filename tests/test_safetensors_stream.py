"""The streaming safetensors writer: the library's bytes, tensors taken one at a time, mapped pages given back."""

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as library_save_file

from llmc_tpu.export.safetensors_stream import Deferred, save_file

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.uint16,
          torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.float64, torch.int64,
          torch.uint64]


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        x = torch.randn(3, 5 + i, generator=g) * 50
        out[f"layer.{i % 4}.w{dtype}".replace("torch.", "")] = x.to(torch.int64).to(dtype) if not dtype.is_floating_point \
            else x.to(dtype)
    out["a.scalar"] = torch.tensor(2.5)
    out["b.empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["z.µ.unicode"] = torch.arange(6, dtype=torch.int32)
    return out


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_bytes_are_the_library_s(tmp_path, metadata):
    tensors = mixed_tensors()
    library_save_file(tensors, tmp_path / "lib.safetensors", metadata=metadata)
    save_file(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


@pytest.mark.parametrize("build_ahead", [True, False])
def test_deferred_entries_are_built_once_and_checked(tmp_path, build_ahead):
    """Deferred entries (every other one and runs of them) give the library's bytes, whether each is built while the
    one before it is written or in its turn; a built tensor that is not what was announced is refused."""
    tensors = mixed_tensors()
    built = []

    def later(name):
        def make():
            built.append(name)
            return tensors[name]
        return Deferred(tensors[name].dtype, tuple(tensors[name].shape), make)

    deferred = [n for i, n in enumerate(sorted(tensors)) if n.startswith("layer.1") or i % 2]
    entries = {n: later(n) if n in deferred else t for n, t in tensors.items()}
    save_file(entries, tmp_path / "ours.safetensors", metadata={"format": "pt"}, build_ahead=build_ahead)
    library_save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    assert sorted(built) == sorted(deferred)
    wrong = {"a": Deferred(torch.float32, (2, 2), lambda: torch.zeros(2, 2)),
             "x": Deferred(torch.float32, (2, 2), lambda: torch.zeros(2, 3))}
    with pytest.raises(ValueError, match="x: built as"):
        save_file(wrong, tmp_path / "bad.safetensors", build_ahead=build_ahead)


def test_mapped_source_pages_are_given_back(tmp_path):
    """Copying a mapped file's tensors into a new file leaves them readable and equal (pages re-read from the file)."""
    src = {f"w{i}": torch.randn(512, 1024) for i in range(4)}
    library_save_file(src, tmp_path / "src.safetensors")
    mapped = load_file(tmp_path / "src.safetensors")  # views of the file's mapping
    save_file(mapped, tmp_path / "copy.safetensors")
    again = load_file(tmp_path / "copy.safetensors")
    assert all(torch.equal(again[k], src[k]) and torch.equal(mapped[k], src[k]) for k in src)


def _rss_file_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="pages are given back on Linux only")
def test_writing_a_mapped_model_keeps_it_out_of_resident_memory(tmp_path):
    """The library's writer leaves every page of a mapped source resident; ours gives each tensor's back."""
    library_save_file({f"w{i}": torch.randn(1024, 2048) for i in range(8)}, tmp_path / "src.safetensors")  # 64 MiB
    growth = {}
    for name, writer in (("library", library_save_file), ("ours", save_file)):
        mapped = load_file(tmp_path / "src.safetensors")
        before = _rss_file_mib()
        writer(mapped, tmp_path / f"{name}.safetensors")
        growth[name] = _rss_file_mib() - before
        del mapped
    assert growth["library"] > 48 and growth["ours"] < 8, growth


def test_the_writers_sha256_is_the_files_and_a_changed_file_is_hashed_again(tmp_path):
    """The manifest takes the digest the writer computed while writing, and only while the file is as written."""
    import hashlib
    import os

    from llmc_tpu.export import manifest

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16)}, path)
    assert manifest._sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path.resolve()) in manifest._WRITTEN
    with open(path, "ab") as f:
        f.write(b"x")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert manifest._sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sharded_save_writes_each_shard_as_the_library_would_and_raises_a_shard_s_error(tmp_path, tiny_llama,
                                                                                         monkeypatch):
    """``save_hf_folder`` writes its shards side by side: every file is the library's bytes for its tensors, the
    index names every tensor, the manifest has each file's own sha256, and one shard's failure fails the save."""
    import hashlib
    import json

    from llmc_tpu.export import hf_folder, manifest, safetensors_stream
    from llmc_tpu.models.loading import load_model

    loaded = load_model(str(tiny_llama))
    monkeypatch.setattr(hf_folder, "SHARD_SIZE", "300KB")
    dest = hf_folder.save_hf_folder(loaded.model, loaded.tokenizer, tiny_llama, tmp_path / "sharded")
    shards = sorted(dest.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    index = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    state = {k: v.to(torch.bfloat16) for k, v in loaded.model.state_dict().items() if k != "lm_head.weight"
             or not loaded.model.config.tie_word_embeddings}
    assert set(index) == set(state)
    for shard in shards:
        tensors = load_file(shard)
        assert {k for k, f in index.items() if f == shard.name} == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(t, state[name]), name
        library_save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / "lib.safetensors").read_bytes(), shard.name
        assert manifest._WRITTEN[str(shard.resolve())][2] == hashlib.sha256(shard.read_bytes()).hexdigest()

    real_save = safetensors_stream.save_file

    def second_shard_fails(entries, filename, metadata=None):
        if "00002-of" in str(filename):
            raise OSError("disk full")
        return real_save(entries, filename, metadata)

    monkeypatch.setattr(safetensors_stream, "save_file", second_shard_fails)
    with pytest.raises(OSError, match="disk full"):
        hf_folder.save_hf_folder(loaded.model, loaded.tokenizer, tiny_llama, tmp_path / "failed")
