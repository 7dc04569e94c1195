"""The model server's runtime: builds the backend (model, chat template, Medusa, engine) from settings,
and closes it. Used by the HTTP server, backend/local.py, tuning, benchmarks and tests:

    with ModelService(settings) as service:   # load(); close() on exit
        run_requests(service, [...])
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import llguidance
from prometheus_client import CollectorRegistry

from backend.chat_template import ChatTemplate, choose_template
from backend.embeddings import Embedder, EmbedRefused, open_embedder
from backend.config import BackendSettings
from backend.engine import Engine
from backend.grammar import GrammarCompiler
from backend.devices import describe_devices, list_devices
from backend.llama_model import ContextConfig, LlamaModel
from backend.spec.build import build_speculator, heads_path, report
from backend.spec.speculator import Speculator
from backend.spec.verify_rows import VerifyLimit, verify_limit
from backend.metrics import EngineMetrics, ServiceCollector
from backend.model_files import default_cache_dir, resolve_model
from backend.prepare import PreparedRequest, prepare
from backend.preset import load_preset
from common.protocol import DeviceReport, ErrorEvent, GenerateBatch, GrammarReport, Health, MedusaReport, ModelInfo, Stats
from common.protocol import EmbedRequest, EmbedResponse

log = logging.getLogger("backend.runtime")


class ModelService:
    """Loads the model once and holds what the routes need."""

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.model: LlamaModel | None = None
        self.engine: Engine | None = None
        self.template: ChatTemplate | None = None
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self.active_ids: set[str] = set()
        self.speculator: Speculator | None = None
        self.limit: VerifyLimit | None = None  # the most rows of a verify decode, measured at load
        self.grammars: GrammarCompiler | None = None
        self.embedder: Embedder | None = None  # a second context on the same model (backend/embeddings.py)
        self.embeddings_off = "embeddings are turned off on this model server (EMBEDDINGS=false)"
        # /metrics: one registry per service (tests run several in a process)
        self.metrics_registry = CollectorRegistry()
        self.engine_metrics = EngineMetrics(self.metrics_registry)
        self.metrics_registry.register(ServiceCollector(self))

    def __enter__(self) -> "ModelService":
        self.load()
        if self.error:
            self.close()
            raise RuntimeError(self.error)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine thread, then free the context and the model (in that order)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.embedder is not None:  # its context was made from the model: free it first
            self.embedder.close()
            self.embedder = None
        if self.model is not None:
            self.model.close()
            self.model = None

    def medusa_report(self) -> MedusaReport | None:
        return report(self.speculator) if self.speculator is not None else None

    def speculation_report(self) -> dict | None:
        return self.speculator.report() if self.speculator is not None else None

    def live_info(self) -> ModelInfo:
        """/info: what was loaded, and whether Medusa drafts now (a memory that cannot drop a rejected
        draft switches speculation off)."""
        on = self.speculator is not None and self.speculator.on
        return self.info.model_copy(update={"medusa": on, "medusa_report": self.medusa_report(),
                                            "speculation": self.speculation_report()})

    def stats(self) -> Stats:
        st = self.engine.stats
        return Stats(active_requests=len(self.active_ids), steps=st.steps, prompt_tokens=st.prompt_tokens,
                     tokens_generated=st.tokens_generated, decode_seconds=round(st.decode_seconds, 3),
                     step_seconds=round(st.step_seconds, 3),
                     medusa=self.medusa_report(), speculation=self.speculation_report(),
                     prompt_cache=self.engine.slots.stats(), grammar=self.grammar_report(),
                     devices=self.device_reports(), n_gpu_layers=self.model.n_gpu_layers if self.model is not None else 0,
                     verify=self.limit.as_dict() if self.limit is not None else None)

    def device_reports(self) -> list[DeviceReport]:
        """The devices llama.cpp computes on, memory read now (GPU memory used includes other processes')."""
        return [DeviceReport(name=d.name, description=d.description, kind=d.kind, memory_total_bytes=d.memory_total,
                             memory_used_bytes=d.memory_used) for d in list_devices()]

    def grammar_report(self) -> GrammarReport:
        g, st = self.grammars, self.engine.stats
        return GrammarReport(library=f"llguidance {llguidance.__version__}", compiled=g.compiles, cache_hits=g.hits,
                             compile_seconds=round(g.compile_seconds, 4), forced_drafted=st.forced_drafted,
                             forced_accepted=st.forced_accepted)

    def load(self) -> None:
        try:
            s = self.settings = apply_preset(self.settings)
            path = resolve_model(s.model, Path(s.model_cache) if s.model_cache else None)
            log.info("loading %s", path)
            model = LlamaModel(
                path,
                ContextConfig(
                    s.ctx_size, s.n_parallel, s.threads, s.batch_size, s.extra_buffers,
                    embeddings=heads_path(s.medusa_heads, path) is not None,
                    n_gpu_layers=s.n_gpu_layers, main_gpu=s.main_gpu, tensor_split=s.tensor_split_values(),
                    n_parked=0 if s.prompt_cache == "off" else s.parked_seqs,
                ),
            )
            self.limit = verify_limit(model, s.exactness)
            self.speculator = build_speculator(s, model, self.limit)
            if (self.speculator is None or not self.speculator.on) and model.embeddings:
                model.stop_hidden_states()  # heads given but the tuning keeps Medusa off
            self.template = choose_template(
                s.chat_template, model.chat_template(), model.meta("general.architecture") or "", model.meta("general.name") or path.name,
                model.meta("general.finetune") or "",
            )
            self.grammars = GrammarCompiler(model, s.grammar_cache)
            self.engine = Engine(model, prefill_chunk=s.prefill_chunk, speculator=self.speculator,
                                 cache_mode=s.prompt_cache, cache_ram_bytes=s.prompt_cache_ram_mb << 20,
                                 fast_forward=s.grammar_fast_forward, metrics=self.engine_metrics, limit=self.limit,
                                 cache_answers=s.prompt_cache_answers == "reuse")
            self.engine.start()
            if s.embeddings:
                self.embedder, self.embeddings_off = open_embedder(model, s.embeddings_ctx, s.embeddings_batch, s.threads)
            self.info = ModelInfo(
                name=s.model_name or path.name.removesuffix(".gguf"),
                path=str(path),
                n_ctx=model.n_ctx_per_seq,
                n_vocab=model.n_vocab,
                n_parallel=model.n_parallel,
                chat_template=self.template.text,
                chat_template_source=self.template.source,
                medusa=self.speculator is not None and self.speculator.on,
                created=int(time.time()),
            )
            self.model = model
            log.info("ready: %s (n_ctx %d per request, %d parallel, %d parked) on %s", self.info.name, model.n_ctx_per_seq,
                     model.n_parallel, model.n_parked, describe_devices(list_devices(), model.n_gpu_layers))
        except Exception as e:  # reported by /health; the process stays up to say why
            log.exception("model failed to load")
            self.error = f"{type(e).__name__}: {e}"

    async def embed(self, req: EmbedRequest) -> EmbedResponse:
        """POST /embed, on the embedder's own thread (never the engine's); raises EmbedRefused."""
        if self.embedder is None:
            raise EmbedRefused(self.embeddings_off, code="unsupported", param="model")
        return await self.embedder.run(req)

    def health(self) -> Health:
        if self.error:
            return Health(status="error", detail=self.error)
        if self.model is None:
            return Health(status="loading")
        if not self.engine.is_alive():
            return Health(status="error", detail="engine thread stopped")
        return Health(status="ok")

    def prepare_one(self, req) -> PreparedRequest | ErrorEvent:
        return prepare(self.model, self.template, req, self.grammars)

    def prepare_all(self, batch: GenerateBatch) -> list[PreparedRequest | ErrorEvent]:
        out = []
        seen: set[str] = set()
        for req in batch.requests:
            if req.id in seen or req.id in self.active_ids:
                out.append(ErrorEvent(id=req.id, message=f"request id {req.id!r} is already in use", code="invalid_request"))
            else:
                out.append(self.prepare_one(req))
            seen.add(req.id)
        return out


def apply_preset(s: BackendSettings) -> BackendSettings:
    """PRESET=name fills the model, heads, tree and chat template a prepared preset recorded,
    where those settings were left at their defaults."""
    if not s.preset:
        return s
    p = load_preset(s.preset, Path(s.model_cache) if s.model_cache else default_cache_dir())
    if s.model not in ("", "default"):
        return s  # MODEL overrides the preset: its heads and template belong to the preset's model
    fill = {
        "model": p["model"],
        "medusa_heads": p["medusa_heads"] if s.medusa_heads == "auto" else s.medusa_heads,
        "medusa_tree": s.medusa_tree or p["medusa_tree"],
        "chat_template": s.chat_template or p["chat_template"],
        "model_name": s.model_name or p["name"],
    }
    return s.model_copy(update=fill)
