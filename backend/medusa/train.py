"""Train Medusa heads for any GGUF model on this CPU (Medusa-1: frozen base, self-distillation).

    python -m backend.medusa.train --model default --out heads/gemma-3-270m-q4_k_m

1. Data: prompts that ship with the repo and with Python itself (backend/medusa/data/prompts.txt
   and paragraphs of the standard library's pydoc topics), continued greedily by the served model
   through llama.cpp, several sequences per decode, recording the post-norm hidden state of every
   generated token (embeddings, pooling NONE) next to the token ids. Saved in shards: resumable.
2. Vocabulary subset: the most frequent target tokens of the training split, with a token map (a
   full projection per head onto Gemma's 262,144 tokens would be 168M parameters).
3. Heads: ResBlock (zero-initialised, so it starts as the identity) + projection initialised from
   the base model's own output rows; per-head cross-entropy against the token 2+k ahead, weights
   0.8^k, AdamW lr 1e-3 with a cosine schedule. A checkpoint per epoch: resumable.
4. A held-out report (sequences of prompts never trained on): per-head top-1 / top-5 accuracy over
   the full vocabulary, and the export in the format the server loads (fp16 safetensors).

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
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from backend.llama_model import ContextConfig, LlamaModel
from backend.medusa.heads import Head, MedusaHeads
from backend.medusa.init_heads import output_rows
from backend.model_files import resolve_model

log = logging.getLogger("backend.medusa.train")
PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"
LOSS_DECAY = 0.8


STDLIB_MODULES = (
    "abc argparse asyncio base64 bisect calendar collections configparser contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html http io "
    "ipaddress itertools json logging math mimetypes operator os pathlib pickle pprint queue random re "
    "sched secrets shlex shutil socket sqlite3 statistics string struct subprocess tarfile tempfile "
    "textwrap threading time timeit tokenize traceback types typing unittest urllib uuid warnings weakref "
    "xml zipfile zlib"
).split()


def _openings(text: str, rng: random.Random, per_paragraph: int) -> list[str]:
    """Prompts from prose: the first words of a paragraph, and of a few of its later sentences."""
    out = []
    for para in text.split("\n\n"):
        words = para.split()
        if len(words) < 12 or not para.strip()[:1].isalpha():
            continue
        starts = [0] + [i + 1 for i, w in enumerate(words[:-8]) if w.endswith(".") and words[i + 1][:1].isupper()]
        for i in starts[:per_paragraph]:
            out.append(" ".join(words[i : i + rng.randint(6, 16)]))
    return out


def training_prompts(limit: int, seed: int = 0) -> list[str]:
    """Prompts that ship with the repo (backend/medusa/data/prompts.txt) and with Python itself (the
    pydoc topics and the standard library's docstrings), deduplicated and shuffled."""
    import importlib
    import inspect
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    prose = [topics[k] for k in sorted(topics)]
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        prose.append(inspect.getdoc(mod) or "")
        with warnings.catch_warnings():  # reading some deprecated names warns
            warnings.simplefilter("ignore")
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr, None)
                if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                    prose.append(inspect.getdoc(obj) or "")
    found = []
    for text in prose:
        found += _openings(text, rng, per_paragraph=3)
    found = list(dict.fromkeys(found))
    rng.shuffle(found)
    own = [line for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(own + found))[:limit]


# --- 1. self-distillation data ------------------------------------------------------------------
def generate_shard(model: LlamaModel, prompts: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    """Greedy continuations of up to n_parallel prompts at once; per generated token its hidden state
    (float16) and id. Returns flat arrays plus sequence offsets."""
    n = len(prompts)
    toks = [model.tokenize(p, True)[: model.n_ctx_per_seq // 2] for p in prompts]
    nxt = [int(model.prefill(t, s).argmax()) for s, t in enumerate(toks)]
    pos = [len(t) for t in toks]
    hidden = [[] for _ in range(n)]
    ids = [[nxt[s]] for s in range(n)]
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
            if model.is_eog(nxt[s]):
                live[s] = False
    for s in range(n):
        model.seq_rm(s)
    lengths = np.array([len(h) for h in hidden], dtype=np.int64)
    return {
        "hidden": np.concatenate([np.stack(h) for h in hidden if h]),
        "ids": np.concatenate([np.array(i[: len(h) + 1], dtype=np.int64) for i, h in zip(ids, hidden) if h]),
        "lengths": lengths[lengths > 0],
    }


def collect(model_path: Path, prompts: list[str], max_tokens: int, data_dir: Path, n_parallel: int, threads: int) -> list[Path]:
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
        ctx = ContextConfig(512, n_parallel, threads, 512, False, embeddings=True)
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


def examples(paths: list[Path], n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states [N, H] and targets [N, n_heads] (token ids, -1 past a sequence's end): head k at
    generated token i predicts generated token i + 2 + k (the base model itself predicts i + 1)."""
    xs, ys = [], []
    for p in paths:
        d = np.load(p)
        hid, ids, lengths = d["hidden"], d["ids"], d["lengths"]
        h0 = i0 = 0
        for n in lengths:
            seq_ids = ids[i0 : i0 + n + 1]  # fed tokens y_0..y_{n-1} and the last prediction y_n
            y = np.full((n, n_heads), -1, dtype=np.int64)
            for k in range(n_heads):
                span = n + 1 - (2 + k)  # positions i with i + 2 + k <= n
                if span > 0:
                    y[:span, k] = seq_ids[2 + k : 2 + k + span]
            xs.append(hid[h0 : h0 + n])
            ys.append(y)
            h0 += n
            i0 += n + 1
    return np.concatenate(xs), np.concatenate(ys)


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


def make_module(hidden: int, n_heads: int, proj_init: np.ndarray):
    import torch
    from torch import nn

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.linear.weight)  # starts as the identity, as Medusa does
            nn.init.zeros_(self.linear.bias)

        def forward(self, x):
            return x + nn.functional.silu(self.linear(x))

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList()
            for _ in range(n_heads):
                proj = nn.Linear(hidden, proj_init.shape[0], bias=False)
                proj.weight.data = torch.tensor(proj_init).clone()
                self.heads.append(nn.Sequential(ResBlock(), proj))

        def forward(self, x):
            return [h(x) for h in self.heads]

    return Heads()


def evaluate(module, x: np.ndarray, y: np.ndarray, token_map: np.ndarray, batch: int = 2048) -> dict:
    import torch

    n_heads = y.shape[1]
    top1 = np.zeros(n_heads)
    top5 = np.zeros(n_heads)
    counts = np.zeros(n_heads)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs = module(torch.tensor(x[i : i + batch], dtype=torch.float32))
            for k, out in enumerate(outs):
                tgt = y[i : i + batch, k]
                valid = tgt >= 0
                pred = token_map[torch.topk(out, min(5, out.shape[-1]), dim=-1).indices.numpy()]
                top1[k] += (pred[valid, 0] == tgt[valid]).sum()
                top5[k] += (pred[valid] == tgt[valid, None]).any(axis=1).sum()
                counts[k] += valid.sum()
    return {
        "top1": [round(float(a / max(c, 1)), 4) for a, c in zip(top1, counts)],
        "top5": [round(float(a / max(c, 1)), 4) for a, c in zip(top5, counts)],
        "positions": [int(c) for c in counts],
    }


def train(model_path: Path, out: Path, x_tr, y_tr, x_ho, y_ho, n_heads: int, vocab: int, epochs: int,
          lr: float, batch: int, seed: int) -> dict:
    import torch

    torch.manual_seed(seed)
    token_map = build_vocab(y_tr, vocab)
    coverage = float(np.isin(y_tr[y_tr >= 0], token_map).mean())
    log.info("vocabulary subset: %d tokens cover %.1f%% of training targets", len(token_map), 100 * coverage)
    module = make_module(x_tr.shape[1], n_heads, output_rows(model_path, token_map))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x_tr) / batch)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    ckpt = out / "train-checkpoint.pt"
    setup = {"n_heads": n_heads, "lr": lr, "batch": batch, "seed": seed, "positions": len(x_tr)}  # resume only the same run
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
    yt = torch.tensor(to_subset(y_tr, token_map))
    weights = [LOSS_DECAY**k for k in range(n_heads)]
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(xt), generator=gen)
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for b in bar:
            idx = order[b * batch : (b + 1) * batch]
            outs = module(xt[idx])
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
    report = {
        "held_out": evaluate(module, x_ho, y_ho, token_map),
        "train_sample": evaluate(module, x_tr[:20000], y_tr[:20000], token_map),
        "loss_per_epoch": history,
        "vocab_subset": len(token_map),
        "subset_coverage_of_targets": round(coverage, 4),
    }
    heads = MedusaHeads(
        [
            Head([(h[0].linear.weight.detach().numpy().copy(), h[0].linear.bias.detach().numpy().copy())],
                 h[1].weight.detach().numpy().copy())
            for h in module.heads
        ],
        token_map=token_map,
    )
    return report | {"heads": heads}


def run(model_path: Path, out: Path, prompts: list[str], held_out: float = 0.1, max_tokens: int = 128,
        n_heads: int = 3, vocab: int = 2048, epochs: int = 4, lr: float = 1e-3, batch: int = 256,
        n_parallel: int = 8, threads: int = 0, seed: int = 0, command: str = "") -> dict:
    """Everything the command does; returns the report (also written to out/report.json)."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    t0 = time.time()
    n_ho = max(1, int(len(prompts) * held_out))
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held, trained = sorted(order[:n_ho]), sorted(order[n_ho:])
    # The held-out prompts, for measuring acceptance in the engine (backend.medusa.tune --prompts).
    (out / "held_out_prompts.txt").write_text("".join(prompts[i].replace("\n", " ") + "\n" for i in held))
    paths_tr = collect(model_path, [prompts[i] for i in trained], max_tokens, work / "train", n_parallel, threads)
    paths_ho = collect(model_path, [prompts[i] for i in held], max_tokens, work / "held-out", n_parallel, threads)
    x_tr, y_tr = examples(paths_tr, n_heads)
    x_ho, y_ho = examples(paths_ho, n_heads)
    log.info("%d training positions, %d held out", len(x_tr), len(x_ho))
    result = train(model_path, work, x_tr, y_tr, x_ho, y_ho, n_heads, vocab or int(y_tr.max()) + 1, epochs, lr,
                   batch, seed)
    heads = result.pop("heads")
    heads.save(out / "heads.safetensors", metadata={"model": model_path.name, "command": command}, dtype=np.float16)
    report = {"model": model_path.name, "command": command, "prompts": len(trained), "held_out_prompts": len(held),
              "training_positions": len(x_tr), "held_out_positions": len(x_ho),
              "minutes": round((time.time() - t0) / 60, 1), **result}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("held-out per-head top-1 %s, top-5 %s", report["held_out"]["top1"], report["held_out"]["top5"])
    log.info("wrote %s", out / "heads.safetensors")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="GGUF path or 'default'")
    ap.add_argument("--out", required=True, help="directory for heads.safetensors, the report and the work files")
    ap.add_argument("--prompts", type=int, default=480, help="how many prompts to continue")
    ap.add_argument("--held-out", type=float, default=0.1, help="share of prompts kept out of training")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary subset size (0: every target token seen)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python -m backend.medusa.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run(resolve_model(args.model, None), Path(args.out), training_prompts(args.prompts, args.seed), args.held_out,
        args.max_tokens, args.heads, args.vocab, args.epochs, args.lr, args.batch, args.n_parallel, args.threads,
        args.seed, command)


if __name__ == "__main__":
    main()
