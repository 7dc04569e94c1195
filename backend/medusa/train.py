"""Train Medusa heads for any GGUF model on this CPU (Medusa-1: frozen base, self-distillation).

    python -m backend.medusa.train --model default --out heads/gemma-3-270m-q4_k_m

1. Data: the corpus of backend/medusa/corpus.py (chat questions and instructions through the model's
   chat template, code, prose, lists, JSON, multi-turn chats, "answer from this passage", "rewrite
   this code"), each continued greedily by the served model through llama.cpp, several sequences
   per decode, recording the post-norm hidden state of every generated token (embeddings, pooling
   NONE) next to the token ids; a continuation ends at EOS or at a stop string of the chat template,
   as it would when served. Saved in shards: resumable. A share of every category is held out.
2. Vocabulary subset: the most frequent target tokens of the training split, with a token map (a
   full projection per head onto Gemma's 262,144 tokens would be 168M parameters).
3. Heads (backend/spec/heads.py): Medusa's (a ResBlock on the hidden state, one per head) or
   sequential ones (each depth also reads the embedding of the token before its target: the token
   just chosen, then the draft's own guesses, as Hydra does); projections initialised from the base
   model's own output rows; per-head cross-entropy against the token 2+k ahead, weights 0.8^k, AdamW
   with a cosine schedule. A checkpoint per epoch: resumable.
4. A held-out report (continuations of prompts never trained on): per-head top-1 / top-5 accuracy
   over the full vocabulary, per category, and the acceptance a top-1 draft would get (depth d
   counted only where all depths before it were right); the export in the format the server loads.

torch is needed only here (requirements-medusa.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backend.llama_model import ContextConfig, LlamaModel
from backend.spec.heads import Head, MedusaHeads
from backend.medusa.init_heads import output_rows
from backend.spec.draft_plan import expected_tokens
from backend.model_files import resolve_model
from backend.medusa import corpus

log = logging.getLogger("backend.medusa.train")
PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"
LOSS_DECAY = 0.8


def training_prompts(limit: int, seed: int = 0) -> list[str]:
    """Completion prompts of the repo's own file (backend/medusa/data/prompts.txt), then the corpus's
    prose openings: a plain prompt list for tools that want one (tuning defaults)."""
    own = [line for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    prose = [e.prompt for e in corpus.build(limit, seed) if e.category == "prose"]
    return list(dict.fromkeys(own + prose))[:limit]


# --- 1. self-distillation data ------------------------------------------------------------------
COLLECT_CTX = 1024  # tokens per sequence while collecting: prompt (at most half) + continuation


@dataclass(frozen=True)
class Prompt:
    category: str
    tokens: tuple[int, ...]
    stop: tuple[str, ...] = ()  # the chat template's stop strings: a served continuation ends there


def prepare_prompts(model: LlamaModel, examples: list) -> list[Prompt]:
    """Prompt tokens as the server makes them (backend/prepare.py: the chat template for chats, BOS
    for text); examples: corpus.Example or plain strings. Over-long prompts are dropped."""
    from backend.chat_template import choose_template
    from backend.prepare import prepare
    from common.protocol import ChatMessage, GenerationRequest

    template = choose_template("", model.chat_template(), model.meta("general.architecture") or "",
                               model.meta("general.name") or model.path.name, model.meta("general.finetune") or "")
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            ex = corpus.Example("text", prompt=ex)
        req = GenerationRequest(id=f"p{i}", max_tokens=1, prompt=ex.prompt or None,
                                messages=[ChatMessage(role=r, content=c) for r, c in ex.messages] or None)
        prep = prepare(model, template, req)
        if hasattr(prep, "tokens") and len(prep.tokens) <= COLLECT_CTX // 2:
            out.append(Prompt(ex.category, tuple(prep.tokens), tuple(prep.stop)))
    return out


def generate_shard(model: LlamaModel, prompts: list[Prompt], max_tokens: int) -> dict[str, np.ndarray]:
    """Greedy continuations of up to n_parallel prompts at once; per generated token its hidden state
    (float16) and id. A continuation ends at EOS or where its text reaches a stop string. Returns flat
    arrays plus sequence offsets."""
    n = len(prompts)
    toks = [list(p.tokens) for p in prompts]
    nxt = [int(model.prefill(t, s).argmax()) for s, t in enumerate(toks)]
    pos = [len(t) for t in toks]
    hidden = [[] for _ in range(n)]
    ids = [[nxt[s]] for s in range(n)]
    text = [model.token_bytes(nxt[s]) for s in range(n)]
    stops = [[x.encode() for x in p.stop] for p in prompts]
    live = [not model.is_eog(t) for t in nxt]
    limit = min(max_tokens, model.n_ctx_per_seq - max(pos) - 1)
    for _ in range(limit):
        model.batch_clear()
        rows = []
        for s in range(n):
            if live[s]:
                rows.append((s, model.batch_add(nxt[s], pos[s], s, True)))
        if not rows:
            break
        if model.decode() != 0:
            raise RuntimeError("llama_decode failed while generating")
        for s, r in rows:
            hidden[s].append(model.hidden(r).astype(np.float16))
            nxt[s] = int(model.logits(r).argmax())
            ids[s].append(nxt[s])
            pos[s] += 1
            text[s] += model.token_bytes(nxt[s])
            if model.is_eog(nxt[s]) or any(x in text[s][-64:] for x in stops[s]):
                live[s] = False
    for s in range(n):
        model.seq_rm(s)
    lengths = np.array([len(h) for h in hidden], dtype=np.int64)
    return {
        "hidden": np.concatenate([np.stack(h) for h in hidden if h]),
        "ids": np.concatenate([np.array(i[: len(h) + 1], dtype=np.int64) for i, h in zip(ids, hidden) if h]),
        "lengths": lengths[lengths > 0],
        "categories": np.array([p.category for p, h in zip(prompts, hidden) if h]),
    }


def collect(model_path: Path, prompts: list[Prompt], max_tokens: int, data_dir: Path, n_parallel: int,
            threads: int) -> list[Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    groups = [prompts[i : i + n_parallel] for i in range(0, len(prompts), n_parallel)]
    # A shard's name carries a digest of its prompts, length and model: changed inputs are never reused.
    model_key = (model_path.name, model_path.stat().st_size)
    paths = [
        data_dir / f"shard-{i:05d}-{hashlib.sha1(repr((g, max_tokens, model_key)).encode()).hexdigest()[:10]}.npz"
        for i, g in enumerate(groups)
    ]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        ctx = ContextConfig(COLLECT_CTX, n_parallel, threads, max(512, COLLECT_CTX // 2), False, embeddings=True)
        model = LlamaModel(model_path, ctx)
        try:
            for i in tqdm(todo, desc="generating (self-distillation)", unit="shard"):
                shard = generate_shard(model, groups[i], max_tokens)
                tmp = paths[i].with_suffix(".partial.npz")
                np.savez(tmp, **shard)
                tmp.rename(paths[i])
        finally:
            model.close()
    return paths


def examples(paths: list[Path], n_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hidden states [N, H], tokens [N, n_heads + 1] and each position's category [N]. Row i holds the
    hidden state at generated token i and the tokens i+1 .. i+1+n_heads (-1 past a sequence's end):
    column 0 is what the base model itself predicts there (the token a draft is made after), column
    1 + k head k's target (the token 2+k ahead)."""
    xs, ys, cats = [], [], []
    for p in paths:
        d = np.load(p)
        hid, ids, lengths = d["hidden"], d["ids"], d["lengths"]
        names = d["categories"] if "categories" in d else np.array(["text"] * len(lengths))
        h0 = i0 = 0
        for n, cat in zip(lengths, names):
            seq_ids = ids[i0 : i0 + n + 1]  # fed tokens y_0..y_{n-1} and the last prediction y_n
            y = np.full((n, n_heads + 1), -1, dtype=np.int64)
            for j in range(n_heads + 1):
                span = n + 1 - (1 + j)  # positions i with i + 1 + j <= n
                if span > 0:
                    y[:span, j] = seq_ids[1 + j : 1 + j + span]
            xs.append(hid[h0 : h0 + n])
            ys.append(y)
            cats.append(np.full(n, str(cat)))
            h0 += n
            i0 += n + 1
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(cats)


# --- 2-4. training --------------------------------------------------------------------------------
def build_vocab(targets: np.ndarray, size: int) -> np.ndarray:
    ids, counts = np.unique(targets[targets >= 0], return_counts=True)
    return np.sort(ids[np.argsort(-counts, kind="stable")[:size]])


def to_subset(targets: np.ndarray, token_map: np.ndarray) -> np.ndarray:
    """Token ids -> positions in token_map; -100 (ignored by the loss) outside it."""
    out = np.full(targets.shape, -100, dtype=np.int64)
    idx = np.searchsorted(token_map, targets)
    idx = np.clip(idx, 0, len(token_map) - 1)
    hit = (targets >= 0) & (token_map[idx] == targets)
    out[hit] = idx[hit]
    return out


def make_module(hidden: int, n_heads: int, proj_init: np.ndarray, arch: str = "medusa"):
    """The heads as a torch module: forward(x [N, H], inputs [N, n_heads] (subset indices of the token
    before each depth's target; sequential heads only)) -> per-head logits over the subset."""
    import torch
    from torch import nn

    sequential = arch == "sequential"

    class ResBlock(nn.Module):
        def __init__(self, n_in: int):
            super().__init__()
            self.linear = nn.Linear(n_in, hidden)
            nn.init.zeros_(self.linear.weight)  # starts as the identity, as Medusa does
            nn.init.zeros_(self.linear.bias)

        def forward(self, x, extra=None):
            z = self.linear(x if extra is None else torch.cat([x, extra], dim=-1))
            return x + nn.functional.silu(z)

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList()
            for _ in range(n_heads):
                proj = nn.Linear(hidden, proj_init.shape[0], bias=False)
                proj.weight.data = torch.tensor(proj_init).clone()
                self.heads.append(nn.Sequential(ResBlock(2 * hidden if sequential else hidden), proj))
            if sequential:  # the token map's own output rows, and a zero row for any other token
                self.input_embed = nn.Embedding(proj_init.shape[0] + 1, hidden)
                self.input_embed.weight.data = torch.cat([torch.tensor(proj_init), torch.zeros(1, hidden)])

        def forward(self, x, inputs=None):
            if not sequential:
                return [h(x) for h in self.heads]
            outs = []
            for k, h in enumerate(self.heads):
                x = h[0](x, self.input_embed(inputs[:, k]))
                outs.append(h[1](x))
            return outs

    return Heads()


def _input_rows(tokens: np.ndarray, token_map: np.ndarray) -> np.ndarray:
    """Subset indices of input tokens; any token outside the map (or -1) takes the last row."""
    idx = to_subset(tokens, token_map)
    return np.where(idx < 0, len(token_map), idx)


def evaluate(module, x: np.ndarray, y: np.ndarray, token_map: np.ndarray, batch: int = 2048) -> dict:
    """Per head: top-1 / top-5 accuracy over the full vocabulary, and the acceptance of a top-1 draft
    (depth d counted only where every depth before it was right, as the engine's verification does;
    a sequential head is fed the true tokens, which are its inputs exactly there)."""
    import torch

    n_heads = y.shape[1] - 1
    top1, top5, counts = np.zeros(n_heads), np.zeros(n_heads), np.zeros(n_heads)
    judged, accepted = np.zeros(n_heads), np.zeros(n_heads)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            yb = y[i : i + batch]
            outs = module(torch.tensor(x[i : i + batch], dtype=torch.float32),
                          torch.tensor(_input_rows(yb[:, :n_heads], token_map)))
            alive = np.ones(len(yb), dtype=bool)
            for k, out in enumerate(outs):
                tgt = yb[:, k + 1]
                valid = tgt >= 0
                pred = token_map[torch.topk(out, min(5, out.shape[-1]), dim=-1).indices.numpy()]
                right = pred[:, 0] == tgt
                top1[k] += (right & valid).sum()
                top5[k] += ((pred == tgt[:, None]).any(axis=1) & valid).sum()
                counts[k] += valid.sum()
                judged[k] += (alive & valid).sum()
                accepted[k] += (alive & valid & right).sum()
                alive &= right & valid
    acc = [round(float(a / max(j, 1)), 4) for a, j in zip(accepted, judged)]
    return {
        "top1": [round(float(a / max(c, 1)), 4) for a, c in zip(top1, counts)],
        "top5": [round(float(a / max(c, 1)), 4) for a, c in zip(top5, counts)],
        "draft_acceptance": acc,
        "expected_tokens": [round(expected_tokens(acc, n), 4) for n in range(1, n_heads + 1)],
        "positions": [int(c) for c in counts],
    }


def train(model_path: Path, out: Path, x_tr, y_tr, x_ho, y_ho, c_ho, n_heads: int, vocab: int, epochs: int,
          lr: float, batch: int, seed: int, arch: str = "medusa") -> dict:
    """y_*: tokens [N, n_heads + 1] (examples()); c_ho: each held-out position's category."""
    import torch

    torch.manual_seed(seed)
    token_map = build_vocab(y_tr[:, 1:], vocab)
    coverage = float(np.isin(y_tr[:, 1:][y_tr[:, 1:] >= 0], token_map).mean())
    log.info("vocabulary subset: %d tokens cover %.1f%% of training targets", len(token_map), 100 * coverage)
    module = make_module(x_tr.shape[1], n_heads, output_rows(model_path, token_map), arch)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x_tr) / batch)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    ckpt = out / "train-checkpoint.pt"
    # resume only the same run
    setup = {"n_heads": n_heads, "lr": lr, "batch": batch, "seed": seed, "positions": len(x_tr), "arch": arch}
    start = 0
    history: list[float] = []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        same = (state["token_map"].tolist() == token_map.tolist() and state["epochs"] == epochs
                and state.get("setup") == setup)
        if same:
            module.load_state_dict(state["module"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start = state["epoch"]
            history = state.get("history", [])
            log.info("resuming after epoch %d", start)
    xt = torch.tensor(x_tr, dtype=torch.float32)
    yt = torch.tensor(to_subset(y_tr[:, 1:], token_map))
    it = torch.tensor(_input_rows(y_tr[:, :n_heads], token_map))
    weights = [LOSS_DECAY**k for k in range(n_heads)]
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(xt), generator=gen)
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for b in bar:
            idx = order[b * batch : (b + 1) * batch]
            outs = module(xt[idx], it[idx])
            # A head whose targets in this batch all fall outside the subset adds nothing (not NaN).
            loss = sum(w * loss_fn(o, yt[idx, k]) for k, (w, o) in enumerate(zip(weights, outs))
                       if (yt[idx, k] != -100).any())
            if not torch.is_tensor(loss):
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            if b % 20 == 0:
                bar.set_postfix(loss=f"{running / (b + 1):.3f}")
        history.append(round(running / steps_per_epoch, 4))
        tmp = ckpt.with_suffix(".partial")
        torch.save({"module": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "epochs": epochs, "token_map": token_map, "history": history,
                    "setup": setup}, tmp)
        tmp.replace(ckpt)  # a run killed mid-save leaves the previous checkpoint intact
    module.eval()
    report = {
        "held_out": evaluate(module, x_ho, y_ho, token_map),
        "held_out_by_category": {c: evaluate(module, x_ho[c_ho == c], y_ho[c_ho == c], token_map)
                                 for c in dict.fromkeys(c_ho.tolist())},
        "train_sample": evaluate(module, x_tr[:20000], y_tr[:20000], token_map),
        "loss_per_epoch": history,
        "vocab_subset": len(token_map),
        "subset_coverage_of_targets": round(coverage, 4),
    }

    def weights_of(layer) -> tuple[np.ndarray, np.ndarray]:
        return layer.linear.weight.detach().numpy().copy(), layer.linear.bias.detach().numpy().copy()

    heads = MedusaHeads(
        [Head([weights_of(h[0])], h[1].weight.detach().numpy().copy()) for h in module.heads],
        token_map=token_map,
        input_embed=module.input_embed.weight.detach().numpy().copy() if arch == "sequential" else None,
    )
    return report | {"heads": heads}


def split_held_out(prompts: list[Prompt], share: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training, held out): a share of every category held out (at least one prompt of each)."""
    rng = random.Random(seed)
    train_set, held = [], []
    for cat in dict.fromkeys(p.category for p in prompts):
        group = [p for p in prompts if p.category == cat]
        order = list(range(len(group)))
        rng.shuffle(order)
        n_ho = max(1, int(len(group) * share)) if len(group) > 1 else 0
        held += [group[i] for i in sorted(order[:n_ho])]
        train_set += [group[i] for i in sorted(order[n_ho:])]
    return train_set, held


def run(model_path: Path, out: Path, prompts: list, held_out: float = 0.1, max_tokens: int = 128,
        n_heads: int = 3, vocab: int = 2048, epochs: int = 4, lr: float = 1e-3, batch: int = 256,
        n_parallel: int = 8, threads: int = 0, seed: int = 0, command: str = "", arch: str = "medusa",
        collect_only: bool = False) -> dict:
    """Everything the command does; returns the report (also written to out/report.json). prompts:
    corpus.Example (or plain strings, category "text")."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    t0 = time.time()
    examples_by_key = {(e if isinstance(e, str) else e.key): e for e in prompts}
    with LlamaModel(model_path, ContextConfig(COLLECT_CTX, 1, threads, 512, False)) as model:
        prepared = prepare_prompts(model, list(examples_by_key.values()))
        trained, held = split_held_out(prepared, held_out, seed)
        held_text = [model.detokenize(list(p.tokens)) for p in held]
    # The held-out prompts, for measuring acceptance in the engine (backend.medusa.tune --prompts).
    (out / "held_out_prompts.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in held_text))
    paths_tr = collect(model_path, trained, max_tokens, work / "train", n_parallel, threads)
    paths_ho = collect(model_path, held, max_tokens, work / "held-out", n_parallel, threads)
    if collect_only:
        return {"prompts": len(trained), "held_out_prompts": len(held)}
    x_tr, y_tr, _ = examples(paths_tr, n_heads)
    x_ho, y_ho, c_ho = examples(paths_ho, n_heads)
    log.info("%d training positions, %d held out", len(x_tr), len(x_ho))
    result = train(model_path, work, x_tr, y_tr, x_ho, y_ho, c_ho, n_heads, vocab or int(y_tr.max()) + 1, epochs, lr,
                   batch, seed, arch)
    heads = result.pop("heads")
    heads.save(out / "heads.safetensors", metadata={"model": model_path.name, "command": command}, dtype=np.float16)
    report = {"model": model_path.name, "command": command, "arch": arch, "prompts": len(trained),
              "held_out_prompts": len(held),
              "prompts_per_category": {c: sum(p.category == c for p in trained) for c in dict.fromkeys(p.category for p in trained)},
              "training_positions": len(x_tr), "held_out_positions": len(x_ho),
              "minutes": round((time.time() - t0) / 60, 1), **result}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(readme(report))
    log.info("held-out per-head top-1 %s, top-5 %s", report["held_out"]["top1"], report["held_out"]["top5"])
    log.info("wrote %s", out / "heads.safetensors")
    return report


def readme(report: dict) -> str:
    """The heads' README: how they were made and what they guess on prompts they never saw."""
    ho = report["held_out"]
    n = len(ho["top1"])
    kind = ("sequential heads (each depth also reads the embedding of the token before its target)"
            if report.get("arch") == "sequential" else "Medusa-1 heads (a ResBlock on the hidden state each)")
    lines = [
        f"# Medusa heads for {report['model'].removesuffix('.gguf')}", "",
        "Made on this project's 2-core machine (no GPU) with:", "", "```bash", report["command"], "```", "",
        "The corpus comes from the machine's installed packages; to train on exactly this one, add "
        "`--corpus` with this directory's `corpus.jsonl.gz`.", "",
        f"({report['minutes']} minutes.) {n} {kind}, each projecting onto the {report['vocab_subset']} most frequent "
        f"target tokens ({report['subset_coverage_of_targets']:.1%} of training targets), fp16. Data: "
        f"{report['prompts']} prompts of the corpus (backend/medusa/corpus.py: "
        + ", ".join(f"{c} {k}" for c, k in report.get("prompts_per_category", {}).items())
        + f") continued greedily by the model itself, {report['training_positions']} training positions; "
        f"{report['held_out_prompts']} prompts held out ({report['held_out_positions']} positions), a share of every "
        f"category. `corpus.jsonl.gz` holds the corpus, `held_out_prompts.txt` the held-out prompts. "
        f"Loss per epoch {report['loss_per_epoch']}.", "",
        "Held out, over the full vocabulary: top-1 and top-5 per head (head k guesses the token k+2 ahead), and "
        "the acceptance of a top-1 draft at each depth given the depths before it were accepted (what the "
        "server's verification sees), with the tokens a step would yield:", "",
        "| | " + " | ".join(f"head {k}" for k in range(n)) + " |", "|---|" + "---|" * n,
        "| top-1 | " + " | ".join(f"{v:.3f}" for v in ho["top1"]) + " |",
        "| top-5 | " + " | ".join(f"{v:.3f}" for v in ho["top5"]) + " |",
        "| draft acceptance | " + " | ".join(f"{v:.3f}" for v in ho["draft_acceptance"]) + " |",
        "| tokens per step, draft of 1..k | " + " | ".join(f"{v:.2f}" for v in ho["expected_tokens"]) + " |", "",
        "Per category (held out): draft acceptance by depth, and tokens per step with all heads:", "",
        "| category | positions | " + " | ".join(f"depth {k}" for k in range(n)) + " | tokens per step |",
        "|---|---|" + "---|" * n + "---|",
    ]
    for cat, r in report.get("held_out_by_category", {}).items():
        lines.append(f"| {cat} | {r['positions'][0]} | " + " | ".join(f"{v:.3f}" for v in r["draft_acceptance"])
                     + f" | {r['expected_tokens'][-1]:.2f} |")
    tr = report["train_sample"]
    lines += ["", f"On a sample of the training data: top-1 {tr['top1']}, draft acceptance {tr['draft_acceptance']}.", "",
              "The model server (MEDUSA_HEADS=auto) finds these heads; each step its plan decides whether and how deep a "
              "draft pays, from the live acceptance and this machine's decode costs (README, \"Speculative decoding\").", ""]
    return "\n".join(lines)


def choose_corpus(out: Path, saved_corpus: str | None, per_category: int, seed: int, build=None) -> list:
    """The corpus to train on, saved as out/corpus.jsonl.gz (what the heads were trained and judged on):
    a saved one (--corpus) or one built from this machine's packages."""
    build = build or corpus.build
    saved = out / "corpus.jsonl.gz"
    if saved_corpus:
        examples_ = corpus.load(Path(saved_corpus))
    else:
        # Built from the installed packages' docs and sources: another machine builds another corpus.
        examples_ = build(per_category, seed)
        if saved.exists() and corpus.load(saved) != examples_:
            # Resuming after the machine's packages changed would silently start over: keep the old one.
            saved.replace(out / "corpus.previous.jsonl.gz")
            log.warning("the corpus built here differs from the saved one (now corpus.previous.jsonl.gz): its data "
                        "shards are not reused; pass --corpus %s to resume on it", out / "corpus.previous.jsonl.gz")
    if not saved_corpus or Path(saved_corpus).resolve() != saved.resolve():
        corpus.save(examples_, saved)
    return examples_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="GGUF path or 'default'")
    ap.add_argument("--out", required=True, help="directory for heads.safetensors, the report and the work files")
    ap.add_argument("--per-category", type=int, default=700, help="prompts per corpus category (corpus.CATEGORIES)")
    ap.add_argument("--held-out", type=float, default=0.1, help="share of every category kept out of training")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--arch", choices=("medusa", "sequential"), default="sequential",
                    help="medusa: a ResBlock per head on the hidden state; sequential: each depth also reads the "
                    "embedding of the token before its target")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary subset size (0: every target token seen)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-parallel", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", help="a saved corpus (corpus.jsonl.gz, written beside every set of heads) instead of "
                    "building one from this machine's packages: reproduces a run exactly")
    ap.add_argument("--collect-only", action="store_true", help="generate the data and stop")
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python -m backend.medusa.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples_ = choose_corpus(out, args.corpus, args.per_category, args.seed)
    run(resolve_model(args.model, None), out, examples_, args.held_out, args.max_tokens, args.heads, args.vocab,
        args.epochs, args.lr, args.batch, args.n_parallel, args.threads, args.seed, command, args.arch,
        args.collect_only)


if __name__ == "__main__":
    main()
