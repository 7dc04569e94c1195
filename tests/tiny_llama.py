"""Artefacts the preset test makes itself: a tiny random llama checkpoint in Hugging Face format
(config, safetensors weights, a SentencePiece tokenizer trained here) and Medusa heads in
FasterDecoding's medusa_lm_head.pt layout for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HIDDEN, FF, LAYERS, HEADS = 64, 128, 2, 4
TEXT = """A user asks a question and the assistant answers it politely and helpfully.
The quick brown fox jumps over the lazy dog. Numbers: 1 2 3 4 5 6 7 8 9 10.
Vicuna is a chat assistant trained by fine-tuning LLaMA on user-shared conversations.
"""


def make_tokenizer(out: Path, vocab_size: int = 320) -> int:
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    return vocab_size


def make_hf_llama(out: Path, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32),
               "lm_head.weight": w(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = w(HIDDEN, HIDDEN)
        tensors[p + "mlp.gate_proj.weight"] = w(FF, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = w(FF, HIDDEN)
        tensors[p + "mlp.down_proj.weight"] = w(HIDDEN, FF)
        tensors[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": vocab, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32", "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
    }))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
    }))
    return out


HF_LOGITS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps(model(ids).logits[0].tolist()))
"""


def hf_logits(python: str, hf_dir: Path, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of the checkpoint run by Hugging Face transformers itself (in the
    converter's environment, which has it)."""
    import subprocess

    done = subprocess.run([python, "-c", HF_LOGITS, str(hf_dir), json.dumps(ids)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.array(json.loads(done.stdout.strip().splitlines()[-1]))


def make_fd_heads(out: Path, vocab: int, n_heads: int = 3, seed: int = 1) -> Path:
    """medusa_lm_head.pt with FasterDecoding's keys, fp16 like the published file."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for h in range(n_heads):
        sd[f"{h}.0.linear.weight"] = (torch.randn(HIDDEN, HIDDEN, generator=g) * 0.05).half()
        sd[f"{h}.0.linear.bias"] = (torch.randn(HIDDEN, generator=g) * 0.05).half()
        sd[f"{h}.1.weight"] = (torch.randn(vocab, HIDDEN, generator=g) * 0.05).half()
    torch.save(sd, out / "medusa_lm_head.pt")
    # The published config undercounts its heads; the loader must count keys instead.
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    return out
