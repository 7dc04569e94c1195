"""Turn the MEDUSA_* and PROMPT_LOOKUP settings into a Speculator for a loaded model, or say why
there is none."""

from __future__ import annotations

import logging
from pathlib import Path

from backend.config import BackendSettings
from backend.decode_plan import VERIFY_MAX_ROWS
from backend.llama_model import LlamaModel
from backend.medusa.heads import load_heads
from backend.medusa.planning import measure_costs
from backend.medusa.tree import chain, load_tree
from backend.speculator import Speculator
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
    """The speculator these settings ask for: Medusa's heads (MEDUSA_HEADS) and prompt lookup
    (PROMPT_LOOKUP), with this machine's decode costs measured now; None when both are off."""
    path = heads_path(s.medusa_heads, model.path)
    heads, choices, tuning = None, [], {}
    if path is not None:
        heads = load_heads(path, model.n_embd, model.n_vocab)
        # No MEDUSA_TREE: every head's top-1 guess, shortened per step by the plan.
        choices, tuning = load_tree(s.medusa_tree) if s.medusa_tree else (chain(heads.n_heads), {})
        if tuning.get("enabled") is False:
            log.warning("medusa: off, the tuning found no draft that beats plain decoding: %s", tuning.get("reason", ""))
            heads, choices = None, []
    # A draft that is rejected is dropped from the KV cache: a recurrent or hybrid memory cannot.
    lookup = s.prompt_lookup == "auto" and model.attention_only
    if heads is None and not lookup:
        return None
    costs = measure_costs(model, list(range(1, VERIFY_MAX_ROWS + 1)), reps=3)
    log.info("speculation: measured decode ms, verify rows %s, shared step sequences %s",
             {k: round(v, 1) for k, v in costs[0].items()}, {k: round(v, 1) for k, v in costs[1].items()})
    max_streams = s.medusa_max_streams or (tuning.get("max_streams") if heads is not None else None) or None
    spec = Speculator(heads, choices, costs, lookup=lookup, max_streams=max_streams,
                      pinned=heads is not None and bool(s.medusa_tree),
                      acceptance=s.medusa_acceptance)
    log.info(
        "speculation: medusa %s, prompt lookup %s, %s, %s acceptance",
        f"{heads.n_heads} heads, draft path {[list(c) for c in choices]}" if heads is not None else "off",
        "on" if lookup else "off", "verifying up to %d streams" % max_streams if max_streams else "planned per step",
        s.medusa_acceptance,
    )
    return spec


def report(spec: Speculator) -> MedusaReport | None:
    if spec.heads is None:
        return None
    return MedusaReport(
        heads=spec.heads.n_heads,
        choices=[list(c) for c in spec.choices],
        max_streams=spec.max_streams or 0,
        acceptance="typical" if spec.typical else "lossless",
        note=spec.note,
        **spec.stats.as_dict(),
    )
