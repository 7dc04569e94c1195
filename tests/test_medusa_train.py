"""Medusa training, end to end on a small random llama GGUF the test writes: self-distillation data
through llama.cpp, a vocabulary subset, torch training, held-out report, export the server loads,
resumption without redoing work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.spec.heads import load_heads
from backend.medusa.train import build_vocab, examples, run, to_subset, training_prompts
from bench.synthetic_gguf import LlamaShape, write_llama_gguf

pytest.importorskip("torch")
SHAPE = LlamaShape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=4, n_vocab=1000, n_ctx=512)


def test_targets_are_the_tokens_two_and_more_ahead(tmp_path):
    # One sequence: fed tokens y0..y4 with hidden states h0..h4, and y5 the last prediction.
    np.savez(tmp_path / "s.npz", hidden=np.arange(5, dtype=np.float16)[:, None].repeat(2, 1),
             ids=np.array([10, 11, 12, 13, 14, 15]), lengths=np.array([5]))
    x, y, cats = examples([tmp_path / "s.npz"], n_heads=2)
    assert x.shape == (5, 2) and y.shape == (5, 3) and cats.tolist() == ["text"] * 5
    assert y[:, 0].tolist() == [11, 12, 13, 14, 15]  # the base model at h_i predicts y_{i+1}
    assert y[:, 1].tolist() == [12, 13, 14, 15, -1]  # head 0 at h_i predicts y_{i+2}
    assert y[:, 2].tolist() == [13, 14, 15, -1, -1]


def test_the_corpus_covers_every_category_and_holds_each_out(tmp_path):
    from backend.medusa import corpus
    from backend.medusa.train import Prompt, split_held_out

    examples_ = corpus.build(40)
    cats = [e.category for e in examples_]
    assert set(cats) == set(corpus.CATEGORIES) and all(cats.count(c) == 40 for c in corpus.CATEGORIES)
    assert len({e.key for e in examples_}) == len(examples_)  # deduplicated
    assert any(e.messages and len(e.messages) == 3 for e in examples_ if e.category == "multiturn")
    corpus.save(examples_, tmp_path / "corpus.jsonl.gz")  # --corpus trains on exactly this
    assert corpus.load(tmp_path / "corpus.jsonl.gz") == examples_
    prompts = [Prompt(e.category, (i,)) for i, e in enumerate(examples_)]
    train, held = split_held_out(prompts, 0.1, seed=0)
    assert {p.category for p in held} == set(corpus.CATEGORIES)
    assert all(sum(p.category == c for p in held) == 4 for c in corpus.CATEGORIES)
    assert not {p.tokens for p in train} & {p.tokens for p in held} and len(train) + len(held) == len(prompts)


def test_sequential_heads_in_numpy_draft_what_the_torch_module_predicts(tmp_path):
    import torch

    from backend.spec.heads import load_heads
    from backend.medusa.train import make_module

    torch.manual_seed(0)
    token_map = np.array([3, 8, 20, 41, 77])
    module = make_module(6, 3, np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32), "sequential")
    for p in module.parameters():  # non-trivial weights everywhere (the ResBlocks start at zero)
        p.data = torch.randn_like(p)
    from backend.spec.heads import Head, MedusaHeads

    heads = MedusaHeads([Head([(h[0].linear.weight.detach().numpy(), h[0].linear.bias.detach().numpy())],
                               h[1].weight.detach().numpy()) for h in module.heads], token_map,
                        module.input_embed.weight.detach().numpy())
    heads.save(tmp_path / "h.safetensors")
    back = load_heads(tmp_path / "h.safetensors", 6, 100)
    assert back.sequential
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    last = [8, 99, 3, 41]  # 99 is outside the token map: the unknown row
    drafts = back.draft(x, last, [0, 0, 0])
    # The torch module fed its own guesses: the same chain.
    with torch.no_grad():
        state, prev = torch.tensor(x), torch.tensor([1, 5, 0, 3])  # rows of 8, unknown, 3, 41
        want = []
        for h in module.heads:
            state = h[0](state, module.input_embed(prev))
            prev = h[1](state).argmax(dim=-1)
            want.append(token_map[prev.numpy()])
    assert drafts == np.stack(want, axis=1).tolist()


def test_vocabulary_subset_and_mapping():
    targets = np.array([[5, 5], [7, 9], [5, -1]])
    vocab = build_vocab(targets, 2)
    assert vocab.tolist() == [5, 7]  # 5 twice; 7 and 9 once each: the tie goes to the lower id
    mapped = to_subset(np.array([5, 9, -1, 7]), np.array([5, 7]))
    assert mapped.tolist() == [0, -100, -100, 1]


def test_prompts_ship_with_the_repo_and_python():
    prompts = training_prompts(200)
    assert len(prompts) == 200 and len(set(prompts)) > 190
    assert any("def fibonacci" in p for p in prompts)  # repo file
    assert sum(len(p.split()) >= 6 for p in prompts[100:]) > 90  # pydoc topics paragraphs


def test_train_end_to_end_and_resume(tmp_path, monkeypatch):
    import torch

    from backend.medusa.init_heads import output_rows

    model = write_llama_gguf(tmp_path / "tiny.gguf", SHAPE, weight_type="f32")
    prompts = [f"Sentence number {i} says something about topic {i % 7}." for i in range(8)]
    kw = dict(held_out=0.25, max_tokens=16, n_heads=2, vocab=64, epochs=3, batch=32, n_parallel=4, threads=2)
    report = run(model, tmp_path / "out", prompts, **kw)
    assert report["prompts"] == 6 and report["held_out_prompts"] == 2
    assert len(report["held_out"]["top1"]) == 2 and len(report["loss_per_epoch"]) == 3
    assert all(0 <= a <= b <= 1 for a, b in zip(report["held_out"]["top1"], report["held_out"]["top5"]))
    losses = report["loss_per_epoch"]
    assert losses[0] > losses[1] > losses[2]  # it learns
    heads = load_heads(tmp_path / "out" / "heads.safetensors", SHAPE.n_embd, SHAPE.n_vocab)
    assert heads.n_heads == 2 and heads.token_map is not None and len(heads.token_map) <= 64
    assert json.loads((tmp_path / "out" / "report.json").read_text())["vocab_subset"] == len(heads.token_map)

    # The recorded hidden states line up with the token ids: the model's own output projection of
    # hidden[j] (post-norm) picks ids[j + 1], the greedy token that followed.
    shards = sorted((tmp_path / "out" / "work").rglob("shard-*.npz"))
    w_out = output_rows(model, np.arange(SHAPE.n_vocab))
    hits = total = 0
    for shard in shards:
        d = np.load(shard)
        h0 = i0 = 0
        for n in d["lengths"]:
            predicted = (d["hidden"][h0 : h0 + n].astype(np.float32) @ w_out.T).argmax(axis=1)
            hits += int((predicted == d["ids"][i0 + 1 : i0 + n + 1]).sum())
            total += int(n)
            h0, i0 = h0 + n, i0 + n + 1
    assert total > 100 and hits / total > 0.95

    # Every epoch ends with one checkpoint (torch.save): counting them shows which epochs a run trained.
    real_save, saves = torch.save, []

    def counted_save(*a, **k):
        saves.append(1)
        return real_save(*a, **k)

    monkeypatch.setattr(torch, "save", counted_save)
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = run(model, tmp_path / "out", prompts, **kw)  # data and all epochs are done: nothing redone
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    assert saves == []  # no epoch trained again
    monkeypatch.setattr(torch, "save", real_save)
    assert again["loss_per_epoch"] == report["loss_per_epoch"] and again["held_out"] == report["held_out"]
    assert len((tmp_path / "out" / "held_out_prompts.txt").read_text().splitlines()) == 2

    # Killed while saving epoch 2 (epoch 1's checkpoint is on disk), then run again: it resumes
    # after epoch 1 and ends where the uninterrupted run ended.
    saves = []

    def dies_on_second_save(*a, **k):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return real_save(*a, **k)

    monkeypatch.setattr(torch, "save", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(model, tmp_path / "cut", prompts, **kw)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "cut" / "work" / "train-checkpoint.pt", weights_only=False)["epoch"] == 1
    saves.clear()
    monkeypatch.setattr(torch, "save", counted_save)
    resumed = run(model, tmp_path / "cut", prompts, **kw)
    monkeypatch.setattr(torch, "save", real_save)
    assert len(saves) == kw["epochs"] - 1  # epochs 2 and 3 only: epoch 1 came from the checkpoint
    assert resumed["loss_per_epoch"] == pytest.approx(report["loss_per_epoch"], rel=1e-5)
    assert resumed["held_out"] == report["held_out"]
    back = load_heads(tmp_path / "cut" / "heads.safetensors", SHAPE.n_embd, SHAPE.n_vocab)
    np.testing.assert_array_equal(back.token_map, heads.token_map)
    for a, b in zip(back.heads, heads.heads):
        np.testing.assert_allclose(a.proj, b.proj, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(a.blocks[0][0], b.blocks[0][0], rtol=1e-3, atol=1e-4)


def test_a_changed_corpus_never_replaces_the_saved_one_silently(tmp_path):
    from backend.medusa import corpus
    from backend.medusa.train import choose_corpus

    first = [corpus.Example("prose", prompt="one"), corpus.Example("chat", messages=(("user", "two"),))]
    assert choose_corpus(tmp_path, None, 10, 0, build=lambda n, seed: first) == first
    assert corpus.load(tmp_path / "corpus.jsonl.gz") == first
    # The machine changed: the new corpus is used, the old one kept, and --corpus resumes on it.
    second = first[:1]
    assert choose_corpus(tmp_path, None, 10, 0, build=lambda n, seed: second) == second
    assert corpus.load(tmp_path / "corpus.previous.jsonl.gz") == first
    assert choose_corpus(tmp_path, str(tmp_path / "corpus.previous.jsonl.gz"), 10, 0) == first
    assert corpus.load(tmp_path / "corpus.jsonl.gz") == first
    # Training on the saved corpus itself leaves it as it is.
    assert choose_corpus(tmp_path, str(tmp_path / "corpus.jsonl.gz"), 10, 0) == first
