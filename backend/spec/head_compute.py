"""Where Medusa's heads run: numpy on the CPU, torch on the GPU the model is offloaded to.

Both backends take the same heads (backend/spec/heads.py, weights loaded as numpy float32) and
return the same thing: one draft per row of hidden states. They differ only in where the matmuls run:
- "cpu": numpy (MedusaHeads.draft), OpenBLAS held to one thread so that it never takes the cores
  llama.cpp decodes on;
- "cuda" (or "cuda:N"): torch on the device, weights copied there once in float16. Medusa's parallel
  heads are fused: the first ResBlock of every head is one matmul ([heads x H, H] by the hidden
  states), later blocks and the projections batched matmuls over the heads, top-k on the device, and
  one small copy back of [heads, rows, k] token ids. Sequential heads run depth after depth on the
  device (each depth reads the guess before it) and copy the ids back once. Measured on an H200 for
  five Vicuna-7B-shaped heads: separate torch matmuls took 2.1 ms a step; the fused form reads the
  1.3 GB of weights once per step;
- "torch-cpu": the torch code in float32 on the CPU, so that CI checks it gives numpy's drafts.
Drafts decide only how many tokens a verify decode may accept, never which (every draft is verified
against the model's own logits), so float16 rounding on the GPU changes speed, not output.
"""

from __future__ import annotations

import time

import numpy as np

from backend.spec.heads import HeadsError, MedusaHeads


class HeadCompute:
    """Drafts from hidden states, timed (the figures /stats reports under speculation.heads)."""

    device = "cpu (numpy)"

    def __init__(self, heads: MedusaHeads):
        self.heads = heads
        self.calls = 0
        self.seconds = 0.0

    def draft(self, hidden: np.ndarray, last_tokens: list[int], ranks: list[int]) -> list[list[int]]:
        """One draft per row of hidden states [B, H]: at depth d, head d's rank-ranks[d] guess.
        last_tokens: the token each row's logits chose (what sequential heads start from)."""
        t0 = time.perf_counter()
        out = self._draft(hidden, last_tokens, ranks)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out

    def _draft(self, hidden, last_tokens, ranks):
        return self.heads.draft(hidden, last_tokens, ranks)

    def report(self) -> dict:
        return {"device": self.device, "calls": self.calls,
                "mean_ms": round(self.seconds * 1000 / self.calls, 4) if self.calls else None}


class TorchHeads(HeadCompute):
    def __init__(self, heads: MedusaHeads, device: str):
        super().__init__(heads)
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        self.dtype = torch.float32 if self.dev.type == "cpu" else torch.float16
        self.device = f"{device} (torch, {str(self.dtype).removeprefix('torch.')})"
        if self.dev.type == "cpu":
            torch.set_num_threads(1)  # as numpy's BLAS: leave the cores to llama.cpp

        def put(a: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.dev, self.dtype)

        hs = heads.heads
        h = heads.hidden_size
        self.token_map = torch.from_numpy(heads.token_map).to(self.dev) if heads.token_map is not None else None
        self.proj = torch.stack([put(hd.proj) for hd in hs])  # [n, V, H]
        if heads.sequential:
            w0 = [hd.blocks[0][0] for hd in hs]
            self.w_state = [put(w[:, :h]) for w in w0]
            # The token term of a sequential head's first block, precomputed per known token (E W_e^T + b).
            self.token_term = [put(heads.input_embed @ w[:, h:].T + hd.blocks[0][1]) for w, hd in zip(w0, hs)]
            self.rest = [[(put(w), put(b)) for w, b in hd.blocks[1:]] for hd in hs]
        else:
            layers = {len(hd.blocks) for hd in hs}
            if len(layers) != 1:
                raise HeadsError("fused heads need the same number of ResBlocks in every head")
            self.n_layers = layers.pop()
            # Layer 0 of every head as one [n * H, H] matmul; later layers stacked for bmm.
            self.w0 = torch.cat([put(hd.blocks[0][0]) for hd in hs]) if self.n_layers else None
            self.b0 = torch.cat([put(hd.blocks[0][1]) for hd in hs]) if self.n_layers else None
            self.w_rest = [torch.stack([put(hd.blocks[layer][0]) for hd in hs]) for layer in range(1, self.n_layers)]
            self.b_rest = [torch.stack([put(hd.blocks[layer][1]) for hd in hs]) for layer in range(1, self.n_layers)]

    def _silu_res(self, x, z):
        return x + self.torch.nn.functional.silu(z)

    def _ids(self, idx):
        return self.token_map[idx] if self.token_map is not None else idx

    def _draft(self, hidden, last_tokens, ranks):
        torch = self.torch
        x0 = torch.from_numpy(np.atleast_2d(np.asarray(hidden, dtype=np.float32))).to(self.dev, self.dtype)
        n_rows = x0.shape[0]
        if not ranks:
            return [[] for _ in range(n_rows)]
        n = len(ranks)
        with torch.inference_mode():
            if self.heads.sequential:
                return self._sequential(x0, last_tokens, ranks)
            h = x0.shape[1]
            if self.n_layers:
                z = (x0 @ self.w0[: n * h].T + self.b0[: n * h]).view(n_rows, n, h).transpose(0, 1)  # [n, B, H]
                x = self._silu_res(x0.unsqueeze(0), z)
                for w, b in zip(self.w_rest, self.b_rest):
                    x = self._silu_res(x, torch.baddbmm(b[:n].unsqueeze(1), x, w[:n].transpose(1, 2)))
            else:
                x = x0.unsqueeze(0).expand(n, -1, -1)
            logits = torch.bmm(x, self.proj[:n].transpose(1, 2))  # [n, B, V]
            top = torch.topk(logits, max(ranks) + 1, dim=-1).indices  # best first
            picked = top[torch.arange(n, device=self.dev), :, torch.as_tensor(ranks, device=self.dev)]  # [n, B]
            ids = self._ids(picked).cpu().numpy()
        return ids.T.tolist()

    def _sequential(self, x, last_tokens, ranks):
        torch = self.torch
        prev = torch.from_numpy(self.heads.input_index(np.asarray(last_tokens))).to(self.dev)
        out = []
        for d, r in enumerate(ranks):
            x = self._silu_res(x, x @ self.w_state[d].T + self.token_term[d][prev])
            for w, b in self.rest[d]:
                x = self._silu_res(x, x @ w.T + b)
            lg = x @ self.proj[d].T
            pick = torch.topk(lg, r + 1, dim=-1).indices[:, r]
            tok = self._ids(pick)
            out.append(tok)
            prev = self._input_index(tok)
        return torch.stack(out, dim=1).cpu().numpy().tolist()

    def _input_index(self, tokens):
        """input_embed rows for token ids, on the device (MedusaHeads.input_index's rule)."""
        torch = self.torch
        unknown = len(self.heads.input_embed) - 1
        if self.token_map is None:
            return torch.where((tokens >= 0) & (tokens < unknown), tokens, unknown)
        idx = torch.clamp(torch.searchsorted(self.token_map, tokens), 0, len(self.token_map) - 1)
        return torch.where(self.token_map[idx] == tokens, idx, unknown)


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_device(setting: str, offloaded: bool, main_gpu: int = 0) -> str:
    """HEADS_DEVICE: 'auto' runs the heads on the GPU when the model's layers are offloaded there and
    torch sees CUDA, else on the CPU; 'cpu', 'cuda', 'cuda:N' and 'torch-cpu' as asked."""
    if setting == "auto":
        return f"cuda:{main_gpu}" if offloaded and torch_cuda_available() else "cpu"
    if setting == "cuda":
        return f"cuda:{main_gpu}"
    return setting


def compute_for(heads: MedusaHeads, device: str) -> HeadCompute:
    """The backend that runs these heads on `device` ('cpu', 'torch-cpu', 'cuda', 'cuda:N')."""
    if device == "cpu":
        return HeadCompute(heads)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise HeadsError(f"HEADS_DEVICE={device} needs torch (pip install -r requirements-medusa.txt)") from e
    if device == "torch-cpu":
        return TorchHeads(heads, "cpu")
    if device.startswith("cuda"):
        if not torch_cuda_available():
            raise HeadsError(f"HEADS_DEVICE={device}: torch sees no CUDA device (a CPU-only torch, or no GPU)")
        return TorchHeads(heads, device if ":" in device else "cuda:0")
    raise HeadsError(f"unknown heads device {device!r}: auto, cpu, cuda, cuda:N or torch-cpu")
