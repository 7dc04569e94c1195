"""The speculation runtime's device-facing parts, checked on the CPU: the torch heads backend gives
numpy's drafts, HEADS_DEVICE's choice and refusals, the verify-row limit (pure rule and the probe on
the real default model), EXACTNESS, and the draft plan reading a GPU's cost table."""

from __future__ import annotations

import numpy as np
import pytest

from backend.config import BackendSettings
from backend.spec.build import cost_rows
from backend.spec.draft_plan import CostTable, Option, choose
from backend.spec.head_compute import HeadCompute, choose_device, compute_for, torch_cuda_available
from backend.spec.heads import Head, HeadsError, MedusaHeads
from backend.spec.verify_rows import MAX_ROWS, largest_exact, mixed_chunks_match, rows_match, verify_limit

H, V = 32, 200
rng = np.random.default_rng(7)


def parallel_heads(n: int, layers: int, token_map: bool) -> MedusaHeads:
    v = 60 if token_map else V
    heads = [Head([(rng.normal(0, 0.2, (H, H)).astype(np.float32), rng.normal(0, 0.2, H).astype(np.float32))
                   for _ in range(layers)], rng.normal(0, 1, (v, H)).astype(np.float32)) for _ in range(n)]
    return MedusaHeads(heads, np.sort(rng.choice(V, v, replace=False)) if token_map else None)


def sequential_heads(n: int) -> MedusaHeads:
    v = 60
    token_map = np.sort(rng.choice(V, v, replace=False))
    heads = [Head([(rng.normal(0, 0.2, (H, 2 * H)).astype(np.float32), rng.normal(0, 0.2, H).astype(np.float32))],
                  rng.normal(0, 1, (v, H)).astype(np.float32)) for _ in range(n)]
    return MedusaHeads(heads, token_map, rng.normal(0, 1, (v + 1, H)).astype(np.float32))


@pytest.mark.parametrize("make", [
    lambda: parallel_heads(5, 1, False), lambda: parallel_heads(3, 2, True), lambda: parallel_heads(2, 0, True),
    lambda: sequential_heads(4),
], ids=["medusa-5x1", "medusa-3x2-token-map", "no-resblocks", "sequential"])
@pytest.mark.parametrize("ranks", [[0, 0, 0], [0, 1], [2, 0, 1, 0, 0][:2], [0]])
def test_torch_heads_give_numpys_drafts(make, ranks):
    pytest.importorskip("torch")
    heads = make()
    ranks = ranks[: heads.n_heads]
    hidden = rng.normal(size=(4, H)).astype(np.float32)
    last = [int(t) for t in rng.integers(0, V, 4)]
    numpy_backend, torch_backend = compute_for(heads, "cpu"), compute_for(heads, "torch-cpu")
    assert type(numpy_backend) is HeadCompute and "torch" in torch_backend.device
    assert torch_backend.draft(hidden, last, ranks) == numpy_backend.draft(hidden, last, ranks)
    assert torch_backend.draft(hidden[:1], last[:1], ranks) == numpy_backend.draft(hidden[:1], last[:1], ranks)
    assert torch_backend.draft(hidden, last, []) == [[]] * 4
    assert torch_backend.report()["calls"] == 3 and torch_backend.report()["mean_ms"] > 0


def test_heads_device_choice_and_refusals():
    assert choose_device("auto", offloaded=False) == "cpu"
    assert choose_device("cpu", offloaded=True) == "cpu"
    assert choose_device("cuda", offloaded=False, main_gpu=1) == "cuda:1"
    if not torch_cuda_available():
        assert choose_device("auto", offloaded=True) == "cpu"  # no CUDA torch: numpy
        with pytest.raises(HeadsError, match="sees no CUDA device"):
            compute_for(parallel_heads(1, 1, False), "cuda:0")
    with pytest.raises(HeadsError, match="unknown heads device"):
        compute_for(parallel_heads(1, 1, False), "tpu")
    with pytest.raises(ValueError):
        BackendSettings(heads_device="gpu")


def test_exactness_sets_the_prompt_cache_default_only():
    assert BackendSettings().exactness == "strict" and BackendSettings().prompt_cache == "exact"
    assert BackendSettings(exactness="fast").prompt_cache == "fast"
    assert BackendSettings(exactness="fast", prompt_cache="exact").prompt_cache == "exact"
    with pytest.raises(ValueError):
        BackendSettings(exactness="loose")


def test_the_verify_limit_is_the_run_of_exact_row_counts():
    assert largest_exact({}) == 1
    assert largest_exact({2: True, 3: True, 4: False}) == 3
    assert largest_exact({2: True, 3: False, 4: True}) == 2  # one mismatch ends it
    assert largest_exact({k: True for k in range(2, 100)}) == MAX_ROWS
    a = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
    assert rows_match(a, [x.copy() for x in a])
    assert not rows_match(a, [a[0], np.array([3.0, np.nextafter(4.0, 5.0)])])  # one ulp off
    assert not rows_match(a, a[:1])
    assert cost_rows(7) == [1, 2, 3, 4, 5, 6, 7]
    assert cost_rows(33) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 33]


# An H200's measured decode costs of a 7B Q8_0 (issue 26) and this CPU's of the default model (issue 28).
H200 = {1: 3.84, 2: 4.60, 4: 5.26, 8: 7.31, 16: 7.38, 32: 9.19}
CPU = {1: 12.8, 2: 32.7, 3: 42.9, 4: 44.2, 5: 64.0, 6: 68.7, 7: 71.5}


def test_the_plan_picks_long_drafts_from_a_gpus_cost_table_and_short_ones_from_the_cpus():
    acc = tuple([0.8] * 16)
    draft = Option("lookup", tuple(range(16)), acc)
    gpu = choose([[draft]], CostTable(H200), CostTable({1: 3.84, 4: 4.9}))[0]
    assert gpu is not None and len(gpu.draft) >= 8  # 8-16 rows cost about two rows' time there
    # On the CPU two rows cost 2.55x one: the same draft does not pay; a nearly sure one does, short.
    cpu_batch = CostTable({1: 12.8, 4: 30.0})
    assert choose([[Option("lookup", tuple(range(6)), acc[:6])]], CostTable(CPU), cpu_batch) == [None]
    sure = choose([[Option("lookup", tuple(range(6)), (0.95,) * 6)]], CostTable(CPU), cpu_batch)[0]
    assert sure is not None and len(sure.draft) <= 6


def test_the_probe_on_the_default_model_measures_exact_rows(model_service):
    """On the real model: the limit the probe finds is exact row for row, and under fast it is the cap."""
    limit = model_service.limit
    assert limit.exactness == "strict" and 2 <= limit.rows <= MAX_ROWS
    assert all(limit.probed[k] for k in range(2, limit.rows + 1))
    if limit.rows < MAX_ROWS:
        assert limit.probed[limit.rows + 1] is False

    def check(m, rows: int) -> bool:  # the test's own comparison, at another position than the probe's
        prompt = m.tokenize("A list of colours: red, green, blue, yellow, and", True)
        toks = [int(np.argmax(m.prefill(prompt, 1)))]
        ref = []
        for j in range(rows):
            m.batch_clear()
            m.batch_add(toks[j], len(prompt) + j, 1, True)
            assert m.decode() == 0
            ref.append(m.logits(0).copy())
            toks.append(int(np.argmax(ref[-1])))
        m.seq_rm(1, len(prompt), -1)
        m.batch_clear()
        for j in range(rows):
            m.batch_add(toks[j], len(prompt) + j, 1, True)
        assert m.decode() == 0
        same = all(np.array_equal(ref[j], m.logits(j)) for j in range(rows))
        m.seq_rm(1)
        return same

    assert model_service.engine.call(lambda m: check(m, limit.rows))
    if limit.rows < MAX_ROWS:
        assert not model_service.engine.call(lambda m: check(m, limit.rows + 1))
    assert model_service.stats().verify["verify_max_rows"] == limit.rows
    assert limit.shared_exact is True  # measured on the CPU: a shared step changes no logit
    assert model_service.engine.scheduler.max_draft == limit.rows - 1
    fast = model_service.engine.call(lambda m: verify_limit(m, "fast"))
    assert fast.rows == MAX_ROWS and not fast.probed
    # Prompt chunks past the verify limit and below 64 rows write equal cells (the exact prompt
    # cache's MIXED class); the probe does tell chunks of two classes apart (4 rows then 44).
    assert limit.mixed_exact is True and limit.cell_rules.segments
    assert not model_service.engine.call(lambda m: mixed_chunks_match(m, 3))
    assert model_service.stats().verify["mixed_chunks_exact"] is True


def test_exactness_fast_verifies_longer_drafts_and_no_companions(model_service):
    """EXACTNESS=fast on the real model: verify decodes past the strict limit really run (a copied
    passage gives lookup drafts of 8+ tokens), with no companion rows and the fast prompt cache."""
    from backend.local import run_requests
    from backend.runtime import ModelService
    from common.protocol import GenerationRequest

    passage = ("The lighthouse keeper climbed the ninety-two steps every evening at dusk, trimmed the wick, "
               "polished the great lens with a soft cloth, and wrote the weather in a leather logbook.")
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=2, threads=2,
                                           medusa_heads="none", prompt_lookup="auto", exactness="fast"))
    service.load()
    assert service.error is None, service.error
    try:
        assert service.limit.rows == MAX_ROWS and service.engine.slots.stats().mode == "fast"
        assert service.engine._cells_for_companions() == 0
        prompt = f"{passage}\n\nRepeat the passage above word for word.\n\n{passage}\n\n{passage[:30]}"
        out = run_requests(service, [GenerationRequest(id="fast-1", prompt=prompt, max_tokens=48, temperature=0.0)])
        assert len(out["fast-1"].choices[0].token_ids) == 48
        verified = service.speculator.verified["lookup"]
        assert verified.steps > 0 and len(verified.proposed) > 7 and verified.proposed[7] > 0  # 8+ token drafts
        assert service.stats().verify["exactness"] == "fast"
    finally:
        service.close()
