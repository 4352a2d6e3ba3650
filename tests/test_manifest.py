"""The checksum manifest of a finished run catches missing, changed and added files."""

from llmc_tpu.export.manifest import check_manifest, write_manifest
from llmc_tpu.export.output_dir import OutputDir


def test_manifest_round_trip(tmp_path):
    out = OutputDir(tmp_path / "run")
    (out.path("model")).mkdir()
    out.path("model", "w.bin").write_bytes(b"abc")
    out.path("report.json").write_text("{}")
    final = out.commit()
    assert check_manifest(final) == []
    (final / "model" / "w.bin").write_bytes(b"abd")
    (final / "extra.txt").write_text("x")
    (final / "report.json").unlink()
    problems = check_manifest(final)
    assert "model/w.bin: changed since the run finished" in problems
    assert "report.json: missing" in problems
    assert "extra.txt: not part of the run's output" in problems
    write_manifest(final)
    assert check_manifest(final) == []
    assert "no manifest.json" in check_manifest(tmp_path)[0]
