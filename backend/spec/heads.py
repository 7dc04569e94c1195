"""Medusa heads in numpy: from the base model's post-norm hidden state at token t, head k proposes
the token at t+2+k.

Each head is a stack of ResBlocks (x + SiLU(W x + b)) and a projection onto the vocabulary, or onto a
subset of it with a token map (Gemma's 262,144-token vocabulary makes a full projection per head
needlessly large). Two files load: FasterDecoding's `medusa_lm_head.pt` / `.safetensors` (keys
`{h}.{l}.linear.weight|bias` for the ResBlocks, `{h}.{L}.weight` for the projection) and the
project's own safetensors, which is the same layout plus an optional `token_map`.

Sequential heads (the project's own, `input_embed` in the file) also read the token before their
target, as Hydra's heads do: when a draft is made, the token at t+1 has just been chosen from the
base model's logits, so head 0 sees it, and head k sees head k-1's guess. Depth k's state is
s_k = s_{k-1} + SiLU(W_k [s_{k-1}; e(x_{t+k})] + b_k), s_0 = the hidden state, e a learned embedding
of the token map's tokens (one more row for any other token); its guess is P_k s_k. The base model
stays frozen and every guess is verified by it, so the heads change only how many tokens a step yields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.spec.tree import candidates

_RESBLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_PROJ = re.compile(r"^(\d+)\.(\d+)\.weight$")
HEAD_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt", "heads.safetensors")


class HeadsError(ValueError):
    """A head checkpoint that cannot serve this model; the message says why."""


@dataclass
class Head:
    blocks: list[tuple[np.ndarray, np.ndarray]]  # (W [H, H], b [H]) per ResBlock
    proj: np.ndarray  # [V_head, H]


def _silu_residual(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    return x + z / (1.0 + np.exp(-z))


def _times(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T for a few rows x [B, in] and a weight w [out, in]: computed as (w @ x.T).T, which
    OpenBLAS runs without packing all of w for every call (measured here, 4 rows by a 2048 x 640
    projection: 0.42 ms against 0.92 ms)."""
    return (w @ x.T).T


@dataclass
class _Depth:
    """One sequential head ready to run: its token term precomputed (W [s; e] = W_s s + (E W_e^T)[token],
    the second a table lookup instead of a matmul per step)."""

    w_state: np.ndarray  # [H, H]
    token_term: np.ndarray  # [V_sub + 1, H]: E @ W_e^T + b
    rest: list[tuple[np.ndarray, np.ndarray]]
    proj: np.ndarray


class MedusaHeads:
    def __init__(self, heads: list[Head], token_map: np.ndarray | None = None, input_embed: np.ndarray | None = None):
        if not heads:
            raise HeadsError("no Medusa heads")
        self.heads = heads
        self.token_map = token_map
        self.input_embed = input_embed  # [len(token_map) + 1, H]: sequential heads; None: Medusa's
        self.hidden_size = heads[0].proj.shape[1]
        self._depths: list[_Depth] | None = None  # sequential heads in the form draft() runs

    def _prepared(self) -> list[_Depth]:
        if self._depths is None:
            h = self.hidden_size
            self._depths = [
                _Depth(np.ascontiguousarray(head.blocks[0][0][:, :h], dtype=np.float32),
                       np.ascontiguousarray(_times(self.input_embed, head.blocks[0][0][:, h:]) + head.blocks[0][1], dtype=np.float32),
                       head.blocks[1:], np.ascontiguousarray(head.proj, dtype=np.float32))
                for head in self.heads
            ]
        return self._depths

    @property
    def sequential(self) -> bool:
        return self.input_embed is not None

    def input_index(self, tokens: np.ndarray) -> np.ndarray:
        """Rows of input_embed for token ids: their place in the token map, else the last row."""
        tokens = np.asarray(tokens, dtype=np.int64)
        unknown = len(self.input_embed) - 1
        if self.token_map is None:
            return np.where((tokens >= 0) & (tokens < unknown), tokens, unknown)
        idx = np.clip(np.searchsorted(self.token_map, tokens), 0, len(self.token_map) - 1)
        return np.where(self.token_map[idx] == tokens, idx, unknown)

    def draft(self, hidden: np.ndarray, last_tokens: list[int], ranks: list[int]) -> list[list[int]]:
        """One draft per row of hidden states [B, H]: at depth d, head d's rank-ranks[d] guess.
        last_tokens: the token each row's logits chose (what sequential heads start from)."""
        if not ranks:
            return [[] for _ in range(np.atleast_2d(hidden).shape[0])]
        if not self.sequential:
            props = self.propose(hidden, max(ranks) + 1, n=len(ranks))  # only the heads the draft uses
            return [candidates(props[:, b, :], ranks) for b in range(props.shape[1])]
        x = np.atleast_2d(np.asarray(hidden, dtype=np.float32))
        prev = np.asarray(last_tokens, dtype=np.int64)
        out = np.empty((x.shape[0], len(ranks)), dtype=np.int64)
        for d, r in enumerate(ranks):
            depth = self._prepared()[d]
            x = _silu_residual(x, _times(x, depth.w_state) + depth.token_term[self.input_index(prev)])
            for w, b in depth.rest:
                x = _silu_residual(x, _times(x, w) + b)
            lg = _times(x, depth.proj)
            pick = np.argmax(lg, axis=1) if r == 0 else np.argsort(-lg, axis=1, kind="stable")[:, r]
            prev = self.token_map[pick] if self.token_map is not None else pick
            out[:, d] = prev
        return out.tolist()

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def n_outputs(self) -> int:
        return self.heads[0].proj.shape[0]

    def logits(self, hidden: np.ndarray, n: int | None = None) -> np.ndarray:
        """[n, B, V_head] logits of the first n heads (default all) for hidden states [B, H] (or [H])."""
        x0 = np.atleast_2d(np.asarray(hidden, dtype=np.float32))
        heads = self.heads[: self.n_heads if n is None else n]
        out = np.empty((len(heads), x0.shape[0], self.n_outputs), dtype=np.float32)
        if self.sequential:
            raise HeadsError("sequential heads guess one depth after another: use draft()")
        for k, head in enumerate(heads):
            x = x0
            for w, b in head.blocks:
                x = _silu_residual(x, _times(x, w) + b)
            out[k] = _times(x, head.proj)
        return out

    def propose(self, hidden: np.ndarray, top_k: int, n: int | None = None) -> np.ndarray:
        """[n, B, top_k] vocabulary ids of the first n heads, best first, for hidden states [B, H]."""
        lg = self.logits(hidden, n)
        k = min(top_k, lg.shape[-1])
        idx = np.argpartition(-lg, k - 1, axis=-1)[..., :k]
        order = np.argsort(-np.take_along_axis(lg, idx, axis=-1), axis=-1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=-1)
        return self.token_map[idx] if self.token_map is not None else idx

    def check(self, hidden_size: int, n_vocab: int) -> None:
        """Fail with a clear message unless these heads fit a model of this shape."""
        if self.sequential and self.input_embed.shape[1] != hidden_size:
            raise HeadsError(f"input_embed {self.input_embed.shape} does not match the model's hidden size {hidden_size}")
        if self.sequential and self.token_map is not None and len(self.input_embed) != len(self.token_map) + 1:
            raise HeadsError(f"input_embed has {len(self.input_embed)} rows, the token map {len(self.token_map)} (+1)")
        for k, head in enumerate(self.heads):
            if self.sequential and (not head.blocks or head.blocks[0][0].shape != (hidden_size, 2 * hidden_size)):
                raise HeadsError(f"head {k}: a sequential head's first block must be [{hidden_size}, {2 * hidden_size}]")
            for layer, (w, b) in enumerate(head.blocks):
                cols = 2 * hidden_size if self.sequential and layer == 0 else hidden_size
                if w.shape != (hidden_size, cols) or b.shape != (hidden_size,):
                    raise HeadsError(
                        f"head {k}: ResBlock weight {w.shape} / bias {b.shape} do not match the model's "
                        f"hidden size {hidden_size}"
                    )
            if head.proj.shape[1] != hidden_size:
                raise HeadsError(f"head {k}: projection {head.proj.shape} does not match hidden size {hidden_size}")
            if head.proj.shape[0] != self.n_outputs:
                raise HeadsError(f"head {k}: projection {head.proj.shape} differs from head 0's {self.heads[0].proj.shape}")
        if self.token_map is None:
            if self.n_outputs != n_vocab:
                raise HeadsError(
                    f"the heads project onto {self.n_outputs} tokens but the model's vocabulary has {n_vocab} "
                    "(a vocabulary subset needs a token_map)"
                )
        else:
            if self.token_map.shape != (self.n_outputs,):
                raise HeadsError(f"token_map has shape {self.token_map.shape}, the heads project onto {self.n_outputs}")
            if self.token_map.min() < 0 or self.token_map.max() >= n_vocab:
                raise HeadsError(f"token_map holds ids outside the model's vocabulary of {n_vocab}")

    def save(self, path: Path, metadata: dict[str, str] | None = None, dtype=np.float32) -> None:
        """The project's format: FasterDecoding's key layout in safetensors, plus the token map."""
        from safetensors.numpy import save_file

        tensors = {}
        for h, head in enumerate(self.heads):
            for layer, (w, b) in enumerate(head.blocks):
                tensors[f"{h}.{layer}.linear.weight"] = w.astype(dtype)
                tensors[f"{h}.{layer}.linear.bias"] = b.astype(dtype)
            tensors[f"{h}.{len(head.blocks)}.weight"] = head.proj.astype(dtype)
        if self.token_map is not None:
            tensors["token_map"] = self.token_map.astype(np.int32)
        if self.input_embed is not None:
            tensors["input_embed"] = self.input_embed.astype(dtype)
        save_file(tensors, str(path), metadata={"format": "llm-serve-medusa", **(metadata or {})})


def heads_from_state_dict(state: dict[str, np.ndarray]) -> MedusaHeads:
    """Build heads from a FasterDecoding-layout state dict. The head count comes from the keys (the
    published config's medusa_num_heads can be wrong: vicuna-7b-v1.3's says 2, its file holds 5)."""
    blocks: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    projs: dict[int, tuple[int, np.ndarray]] = {}
    token_map = input_embed = None
    for key, value in state.items():
        arr = np.asarray(value, dtype=np.float32) if key != "token_map" else np.asarray(value, dtype=np.int64)
        if key == "token_map":
            token_map = arr
        elif key == "input_embed":
            input_embed = arr
        elif m := _RESBLOCK.match(key):
            blocks.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = arr
        elif m := _PROJ.match(key):
            projs[int(m[1])] = (int(m[2]), arr)
        else:
            raise HeadsError(f"unexpected key {key!r} in a Medusa head checkpoint")
    if not projs:
        raise HeadsError("no Medusa head projections ('{h}.{layer}.weight') in the checkpoint")
    if sorted(projs) != list(range(len(projs))):
        raise HeadsError(f"head indices {sorted(projs)} are not 0..{len(projs) - 1}")
    heads = []
    for h in range(len(projs)):
        layer, proj = projs[h]
        got = blocks.get(h, {})
        if sorted(got) != list(range(layer)):
            raise HeadsError(f"head {h}: ResBlocks {sorted(got)} but the projection is layer {layer}")
        missing = [f"{h}.{i}.linear.{p}" for i in range(layer) for p in ("weight", "bias") if p not in got[i]]
        if missing:
            raise HeadsError(f"head {h}: missing {', '.join(missing)}")
        heads.append(Head([(got[i]["weight"], got[i]["bias"]) for i in range(layer)], proj))
    return MedusaHeads(heads, token_map, input_embed)


def resolve_heads_file(path: Path) -> Path:
    if path.is_dir():
        for name in HEAD_FILES:
            if (path / name).exists():
                return path / name
        raise HeadsError(f"no Medusa head file ({', '.join(HEAD_FILES)}) in {path}")
    if not path.exists():
        raise HeadsError(f"Medusa heads not found: {path}")
    return path


def load_heads(path: Path, hidden_size: int, n_vocab: int) -> MedusaHeads:
    """Load a head checkpoint (file or directory) and check it against the base model's shape."""
    path = resolve_heads_file(Path(path))
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(str(path))
    elif path.suffix in (".pt", ".bin", ".pth"):
        try:
            import torch
        except ImportError as e:
            raise HeadsError(f"{path.name} is a torch checkpoint: install torch (requirements-medusa.txt) to read it") from e
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in raw.items()}
    else:
        raise HeadsError(f"unknown Medusa head format {path.suffix!r} (.safetensors or .pt)")
    heads = heads_from_state_dict(state)
    heads.check(hidden_size, n_vocab)
    return heads
