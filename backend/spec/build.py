"""Turn the MEDUSA_*, PROMPT_LOOKUP and HEADS_DEVICE settings into a Speculator for a loaded model,
or say why there is none."""

from __future__ import annotations

import logging
from pathlib import Path

from backend.config import BackendSettings
from backend.llama_model import LlamaModel
from backend.spec.heads import load_heads
from backend.spec.costs import COST_KS, measure_costs
from backend.spec.head_compute import choose_device, compute_for
from backend.spec.tree import chain, load_tree
from backend.spec.speculator import Speculator
from backend.spec.verify_rows import VerifyLimit
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


def cost_rows(limit: int) -> list[int]:
    """Row counts whose verify cost is measured at load: every count up to 8, then COST_KS's spacing
    (the cost table interpolates between them), and the limit itself."""
    return sorted({k for k in range(1, min(limit, 8) + 1)} | {k for k in COST_KS if k <= limit} | {limit})


def build_speculator(s: BackendSettings, model: LlamaModel, limit: VerifyLimit) -> Speculator | None:
    """The speculator these settings ask for: Medusa's heads (MEDUSA_HEADS, computed on HEADS_DEVICE)
    and prompt lookup (PROMPT_LOOKUP), with this machine's decode costs up to the verify limit
    measured now; None when both are off."""
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
    costs = measure_costs(model, cost_rows(limit.rows), reps=3)
    log.info("speculation: measured decode ms, verify rows %s, shared step sequences %s",
             {k: round(v, 1) for k, v in costs[0].items()}, {k: round(v, 1) for k, v in costs[1].items()})
    max_streams = s.medusa_max_streams or (tuning.get("max_streams") if heads is not None else None) or None
    compute = compute_for(heads, choose_device(s.heads_device, model.n_gpu_layers > 0, s.main_gpu)) if heads else None
    spec = Speculator(heads, choices, costs, lookup=lookup, max_streams=max_streams,
                      pinned=heads is not None and bool(s.medusa_tree),
                      acceptance=s.medusa_acceptance, compute=compute, max_rows=limit.rows)
    log.info(
        "speculation: medusa %s, prompt lookup %s, %s, %s acceptance, verify decodes up to %d rows",
        f"{heads.n_heads} heads on {compute.device}, draft path {[list(c) for c in choices]}" if heads is not None else "off",
        "on" if lookup else "off", "verifying up to %d streams" % max_streams if max_streams else "planned per step",
        s.medusa_acceptance, limit.rows,
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
