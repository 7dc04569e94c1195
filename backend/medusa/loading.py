"""Turn the MEDUSA_* settings into a Speculator for a loaded model, or say why Medusa stays off."""

from __future__ import annotations

import logging
from pathlib import Path

from backend.config import BackendSettings
from backend.llama_model import LlamaModel
from backend.medusa.heads import load_heads
from backend.medusa.planning import measure_costs
from backend.medusa.speculator import Speculator
from backend.medusa.tree import chain, load_tree
from common.protocol import MedusaReport

log = logging.getLogger("backend.medusa")


SHIPPED_HEADS = Path(__file__).resolve().parent.parent.parent / "heads"


def heads_path(spec: str, model_path: Path) -> Path | None:
    """MEDUSA_HEADS: 'auto' finds heads shipped for this GGUF (heads/<file stem>/), 'none' or '' none."""
    if spec in ("", "none"):
        return None
    if spec == "auto":
        shipped = SHIPPED_HEADS / model_path.stem / "heads.safetensors"
        return shipped if shipped.exists() else None
    return Path(spec)


def build_speculator(s: BackendSettings, model: LlamaModel) -> Speculator | None:
    path = heads_path(s.medusa_heads, model.path)
    if path is None:
        return None
    heads = load_heads(path, model.n_embd, model.n_vocab)
    costs = None
    if s.medusa_tree:
        choices, tuning = load_tree(s.medusa_tree)
    else:
        # No tuning given: measure this machine's cost curve now and tune on live acceptance.
        choices, tuning = chain(heads.n_heads), {}
        costs = measure_costs(model, list(range(1, heads.n_heads + 2)), reps=3)
        log.info("medusa: no MEDUSA_TREE; measured decode ms %s, tuning on the first steps' acceptance",
                 {k: round(v, 1) for k, v in costs[0].items()})
    if tuning.get("enabled") is False:
        log.warning("medusa: off, the tuning found no draft that beats plain decoding: %s", tuning.get("reason", ""))
        return None
    max_streams = s.medusa_max_streams or int(tuning.get("max_streams", 1))
    spec = Speculator(heads, choices, max_streams=max_streams, acceptance=s.medusa_acceptance, costs=costs,
                      fixed_max_streams=bool(s.medusa_max_streams))
    log.info(
        "medusa: %d heads, draft path %s, speculating up to %d streams, %s acceptance",
        heads.n_heads, [list(c) for c in choices], max_streams, s.medusa_acceptance,
    )
    return spec


def report(spec: Speculator) -> MedusaReport:
    return MedusaReport(
        heads=spec.heads.n_heads,
        choices=[list(c) for c in spec.choices],
        max_streams=spec.max_streams,
        acceptance="typical" if spec.typical else "lossless",
        note=spec.note,
        **spec.stats.as_dict(),
    )
