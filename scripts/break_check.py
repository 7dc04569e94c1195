"""Break the code on purpose and check that the tests named for each behaviour fail.

    .venv/bin/python scripts/break_check.py              # every mutation (11 to 30 minutes on 2 cores)
    .venv/bin/python scripts/break_check.py penalties    # those whose name contains a word

Each mutation replaces snippets of the source with a broken version in a scratch copy of the tree
(the working tree is never touched), runs each test that guards the behaviour on its own, and
reports whether every one of them failed on an assertion, as it must (an error in a fixture or a
timeout does not count). A mutation whose snippet is no longer in the source is reported as stale:
update it with the code it guards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    more: tuple[tuple[str, str], ...] = ()  # further (old, new) edits of the same file

    def edits(self) -> list[tuple[str, str]]:
        return [(self.old, self.new), *self.more]


MUTATIONS = [
    Mutation("penalties ignored", "backend/sampling.py",
             "        if params.presence_penalty or params.frequency_penalty:\n",
             "        if False:\n",
             ("tests/test_engine.py::test_penalties_and_logit_bias_change_the_output",)),
    Mutation("penalties count the prompt", "backend/scheduler.py",
             "            self.running.append(req)\n",
             "            for s in req.seqs:\n                for t in req.tokens:\n                    s.sampler.accept(t)\n"
             "            self.running.append(req)\n",
             ("tests/test_engine.py::test_penalties_count_generated_tokens_only",)),
    Mutation("top-p before temperature", "backend/sampling.py",
             "            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(params.temperature))\n"
             "            if params.top_p < 1.0:\n"
             "                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))\n",
             "            if params.top_p < 1.0:\n"
             "                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))\n"
             "            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(params.temperature))\n",
             ("tests/test_engine.py::test_temperature_is_applied_before_top_p",)),
    Mutation("UTF-8 split across deltas", "backend/text_stream.py",
             '        self._held += self._decoder.decode(piece)\n',
             '        self._held += piece.decode("utf-8", "replace")\n',
             ("tests/test_engine.py::test_utf8_is_never_broken_in_a_stream",)),
    Mutation("prefill counted once per choice", "backend/engine.py",
             "            if seq is not main:\n                self.slots.copy(main.slot, seq.slot)\n",
             "            if seq is not main:\n                self.slots.copy(main.slot, seq.slot)\n"
             "                self.stats.prompt_tokens += len(p.tokens)\n",
             ("tests/test_engine.py::test_n_choices_share_the_prompt_and_differ",)),
    Mutation("choice seeds not seed + i", "backend/sequence.py",
             "Sampler(prep.sampling, model.n_vocab, seed_offset=index)",
             "Sampler(prep.sampling, model.n_vocab, seed_offset=2 * index)",
             ("tests/test_engine.py::test_n_choices_share_the_prompt_and_differ",)),
    Mutation("logprobs after temperature", "backend/sequence.py",
             "            lp = [token_logprob(self.model, logits, token, self.top_logprobs)]\n",
             "            lp = [token_logprob(self.model, logits / max(self.sampler.params.temperature, 1e-3), token, self.top_logprobs)]\n",
             ("tests/test_engine.py::test_logprobs_match_a_direct_softmax",)),
    Mutation("prompt logprobs off by one", "backend/logprobs.py",
             "token_logprob(model, logits_of(j - start), tokens[j + 1], top_n)",
             "token_logprob(model, logits_of(j - start), tokens[j], top_n)",
             ("tests/test_engine.py::test_prompt_logprobs_for_echo",)),
    Mutation("chat template drops the system message", "backend/chat_template.py",
             "{% if m.role in ('system', 'developer') %}{{ m.content }}\\n\\n\"", "{% if m.role in ('system', 'developer') %}\"",
             ("tests/test_engine.py::test_chat_messages_use_the_template",)),
    Mutation("grammar mask not applied", "backend/sequence.py",
             "            self.constraint.apply(logits)  # in place: the sampler chain reads these logits\n",
             "            pass\n",
             ("tests/test_grammar_engine.py::test_constrained_greedy_follows_the_schema",)),
    Mutation("a repeated tool call handed out", "common/tool_reply.py",
             "        if key in self._seen:\n            self.duplicate = True\n            return\n",
             "",
             ("tests/test_structured.py::test_reader_drops_a_call_identical_to_an_earlier_one_and_says_so",)),
    Mutation("parameters with $defs embedded without rebasing their refs", "common/tool_format.py",
             "            defs[tool.name] = schema_refs.rebase(arguments, f\"/$defs/{tool.name}\")\n",
             "            defs[tool.name] = arguments\n",
             ("tests/test_structured.py::test_reply_schema_moves_parameters_with_refs_where_their_refs_still_resolve",)),
    Mutation("no companion rows", "backend/decode_plan.py",
             "        if not in_run and needs_companion(pos, n_cells):\n",
             "        if False:\n",
             ("tests/test_engine.py::test_long_prompts_prefilled_while_others_decode_match_alone",
              "tests/test_engine.py::test_generation_to_the_context_end_matches_alone",
              "tests/test_medusa_engine.py::test_n_choices_and_logprobs_are_those_of_plain_decoding")),
    Mutation("prompt cache reuses cells of another class", "backend/decode_plan.py",
             "    while reuse < limit and cached[reuse] != NONE and cached[reuse] == want[reuse]:\n",
             "    while reuse < limit and cached[reuse] != NONE:\n",
             ("tests/test_prompt_cache.py::test_exact_plan_computes_every_cell_as_the_cold_schedule_would",)),
    Mutation("prompt cache takes generated tokens' cells for tiled ones in exact mode", "backend/slots.py",
             "            classes += bytes([VEC]) * (len(kept) - len(classes))\n",
             "            classes += bytes([VEC]) * (len(kept) - len(classes))\n        classes += bytes([TILED]) * (len(kept) - len(classes))\n",
             ("tests/test_prompt_cache.py::test_multi_turn_conversation_is_exact_and_reuses",)),
    Mutation("one unified KV cache", "backend/llama_model.py",
             "        cparams.kv_unified = False\n",
             "        cparams.kv_unified = True\n",
             ("tests/test_engine.py::test_long_prompts_prefilled_while_others_decode_match_alone",
              "tests/test_medusa_engine.py::test_long_prompts_prefilled_while_others_speculate_match_plain")),
    Mutation("Medusa accepts a draft token without checking", "backend/spec/verify.py",
             "        matched = row < len(draft) and token == draft[row]\n",
             "        matched = row < len(draft)\n",
             ("tests/test_medusa_engine.py::test_greedy_alone_is_token_for_token_plain_greedy",)),
    Mutation("a draft walked on past the token that finished the sequence", "backend/spec/verify.py",
             "        if finished or not matched:\n",
             "        if not matched:\n",
             ("tests/test_medusa_engine.py::test_stop_strings_and_eos_inside_a_draft",)),
    Mutation("Medusa never speculates", "backend/spec/speculator.py",
             "            chosen = choose(options, self.chain, self.batch, pinned=self.pinned)\n",
             "            chosen = [None] * len(seqs)\n",
             ("tests/test_medusa_engine.py::test_greedy_concurrent_is_token_for_token_plain_greedy",
              "tests/test_medusa_engine.py::test_seeded_sampling_is_lossless_and_reproducible",
              "tests/test_lookup_engine.py::test_lookup_drafts_are_verified_and_output_is_plain_greedy")),
    Mutation("the verify-row probe never compares", "backend/spec/verify_rows.py",
             "        probed[k] = rows_match(reference[:k], decode(tokens[:k], pos))\n",
             "        probed[k] = True\n",
             ("tests/test_spec_runtime.py::test_the_probe_on_the_default_model_measures_exact_rows",
              "tests/test_lookup_engine.py::test_lookup_drafts_are_verified_and_output_is_plain_greedy")),
    Mutation("fused torch heads pick another rank", "backend/spec/head_compute.py",
             "            top = torch.topk(logits, max(ranks) + 1, dim=-1).indices  # best first\n",
             "            top = torch.topk(logits, max(ranks) + 2, dim=-1).indices[..., 1:]\n",
             ("tests/test_spec_runtime.py::test_torch_heads_give_numpys_drafts",)),
    Mutation("MEDUSA_MAX_STREAMS ignored", "backend/spec/speculator.py",
             "        if self.max_streams is not None and len(seqs) > self.max_streams:  # MEDUSA_MAX_STREAMS\n",
             "        if False:\n",
             ("tests/test_medusa_engine.py::test_max_streams_gates_speculation",)),
    Mutation("the plan verifies drafts that do not pay", "backend/spec/draft_plan.py",
             "        if rate > best_rate:\n",
             "        if True:\n",
             ("tests/test_draft_plan.py::test_under_load_only_drafts_that_beat_the_shared_step_verify",)),
    Mutation("prompt lookup matches its own suffix", "backend/spec/lookup.py",
             "        stop = min(len(toks) - 1, self._indexed + budget)\n",
             "        stop = min(len(toks), self._indexed + budget)\n",
             ("tests/test_draft_plan.py::test_ngram_index_proposes_what_followed_the_latest_match",)),
    Mutation("typical acceptance never takes a draft", "backend/engine.py",
             "                    forced = draft[row]\n",
             "                    forced = None\n",
             ("tests/test_medusa_engine.py::test_typical_acceptance_is_opt_in_and_seed_reproducible",)),
    Mutation("stop string emitted", "backend/text_stream.py",
             "            out, self._held = self._held[:cut], \"\"\n",
             "            out, self._held = self._held, \"\"\n",
             ("tests/test_e2e.py::test_stop_strings_through_the_api_and_sse",
              "tests/test_engine.py::test_stop_string_is_never_emitted",
              "tests/test_medusa_engine.py::test_stop_strings_and_eos_inside_a_draft")),
    Mutation("disconnect does not cancel", "app/generation.py",
             "        if live:\n            self.router.cancel(live)\n",
             "        pass\n",
             ("tests/test_e2e.py::test_client_disconnect_cancels_generation",
              "tests/test_e2e.py::test_non_streaming_client_disconnect_cancels_generation")),
    Mutation("closing /generate does not cancel", "backend/server.py",
             "        if remaining:\n            service.engine.cancel(list(remaining))\n",
             "        if False:\n            service.engine.cancel(list(remaining))\n",
             ("tests/test_e2e.py::test_closing_generate_cancels_the_whole_batch",)),
    Mutation("stream errors sent after the first byte", "app/main.py",
             "        await until_disconnect(request, gen.start())\n        if not stream:\n",
             "        if not stream:\n            await until_disconnect(request, gen.start())\n",
             ("tests/test_e2e.py::test_context_overflow_on_a_stream_is_a_400_before_any_byte",),
             more=(("            async for data in responder.stream():\n",
                    "            if stream:\n                await gen.start()\n"
                    "            async for data in responder.stream():\n"),)),
    Mutation("stop string not a list", "app/schemas.py",
             "        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])\n",
             "        stops = list(self.stop or [])\n",
             ("tests/test_api_mocked.py::test_completion_fields_reach_the_model_server_mapped",)),
    Mutation("max_tokens wins over max_completion_tokens", "app/serving_chat.py",
             "    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens\n",
             "    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens\n",
             ("tests/test_api_mocked.py::test_chat_fields_reach_the_model_server_mapped",)),
    Mutation("temperature default 0", "app/generation.py",
             "        temperature=1.0 if req.temperature is None else req.temperature,\n",
             "        temperature=0.0 if req.temperature is None else req.temperature,\n",
             ("tests/test_api_mocked.py::test_completion_defaults_and_nulls_reach_the_model_server_as_openai_defaults",)),
    Mutation("overloaded becomes 500", "app/generation.py",
             '    "overloaded": TooManyRequests,\n', "",
             ("tests/test_api_mocked.py::test_an_overloaded_model_server_becomes_429",)),
    Mutation("no Retry-After", "app/errors.py",
             '        return {"Retry-After": str(self.retry_after_s)}\n', "        return None\n",
             ("tests/test_api_mocked.py::test_a_full_queue_is_429_with_retry_after_over_http",)),
    Mutation("plan ignores the batch cost", "backend/medusa/planning.py",
             "    max_streams = max(s for s in batch_cost if best_rate > s / batch_cost[s]) if any(",
             "    max_streams = max(s for s in batch_cost) if any(",
             ("tests/test_medusa_units.py::test_plan_picks_the_fastest_length_or_stays_off",)),
    Mutation("hidden states recorded one token late", "backend/medusa/train.py",
             '        "ids": np.concatenate([np.array(i[: len(h) + 1], dtype=np.int64) for i, h in zip(ids, hidden) if h]),\n',
             '        "ids": np.concatenate([np.array(i[1: len(h) + 2], dtype=np.int64) for i, h in zip(ids, hidden) if h]),\n',
             ("tests/test_medusa_train.py::test_train_end_to_end_and_resume",)),
    Mutation("resume restarts the schedule", "backend/medusa/train.py",
             '            sched.load_state_dict(state["sched"])\n', "",
             ("tests/test_medusa_train.py::test_train_end_to_end_and_resume",)),
    Mutation("heads computed without their ResBlocks", "backend/spec/heads.py",
             "            for w, b in head.blocks:\n                x = _silu_residual(x, _times(x, w) + b)\n",
             "            for w, b in head.blocks[:0]:\n                x = _silu_residual(x, _times(x, w) + b)\n",
             ("tests/test_preset.py::test_the_converted_model_and_heads_compute_what_the_originals_compute",)),
    Mutation("sequential heads ignore the token before their target", "backend/spec/heads.py",
             "            x = _silu_residual(x, _times(x, depth.w_state) + depth.token_term[self.input_index(prev)])\n",
             "            x = _silu_residual(x, _times(x, depth.w_state) + depth.token_term[-1])\n",
             ("tests/test_medusa_train.py::test_sequential_heads_in_numpy_draft_what_the_torch_module_predicts",)),
    Mutation("resume retrains from the first epoch", "backend/medusa/train.py",
             '            start = state["epoch"]\n', "            start = 0\n",
             ("tests/test_medusa_train.py::test_train_end_to_end_and_resume",)),
    Mutation("routing ignores prompt-cache affinity", "app/routing.py",
             "    if best > 0:\n", "    if False:\n",
             ("tests/test_routing.py::test_affinity_wins_until_the_holder_is_too_loaded",)),
    Mutation("requests of a failed replica are never retried", "app/replicas.py",
             "            if p.retried or failed.info is None:\n", "            if True:\n",
             ("tests/test_routing.py::test_a_failed_replica_is_taken_out_and_unstarted_requests_are_retried_once",)),
    Mutation("a failed replica stays in rotation", "app/replicas.py",
             "        self._set_up(failed, False)\n        left = []\n", "        left = []\n",
             ("tests/test_routing.py::test_a_failed_replica_is_taken_out_and_unstarted_requests_are_retried_once",)),
]


def scratch_copy() -> Path:
    dest = Path(tempfile.mkdtemp(prefix="break-check-"))
    ignore = shutil.ignore_patterns(".git", ".venv", ".venv-convert", "__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT, dest / "tree", ignore=ignore)
    for venv in (".venv", ".venv-convert"):
        if (ROOT / venv).exists():
            (dest / "tree" / venv).symlink_to(ROOT / venv)
    return dest / "tree"


def apply(text: str, edits: list[tuple[str, str]]) -> str | None:
    """The text with each snippet replaced; None if a snippet does not occur exactly once."""
    for old, new in edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    return text


def run_test(python: str, tree: Path, test: str, timeout_s: float = 1200) -> str:
    """'failed' (an assertion failed), 'passed', or what else happened (error, timeout)."""
    try:
        run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=900", test],
                             cwd=tree, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    if run.returncode == 1 and " failed" in tail and " error" not in tail and "Failed: Timeout >" not in run.stdout:
        return "failed"
    return "passed" if run.returncode == 0 else f"error ({tail or run.stderr[-120:]})"


def main() -> int:
    words = sys.argv[1:]
    chosen = [m for m in MUTATIONS if not words or any(w in m.name for w in words)]
    tree = scratch_copy()
    python = str(ROOT / ".venv" / "bin" / "python")
    bad = 0
    try:
        for m in chosen:
            path = tree / m.path
            original = path.read_text()
            broken = apply(original, m.edits())
            if broken is None:
                print(f"STALE   {m.name}: a snippet is not found once in {m.path}")
                bad += 1
                continue
            path.write_text(broken)
            t0 = time.monotonic()
            outcomes = [run_test(python, tree, test) for test in m.tests]
            path.write_text(original)
            caught = all(o == "failed" for o in outcomes)
            print(f"{'caught ' if caught else 'MISSED '} {m.name} ({time.monotonic() - t0:.0f} s): "
                  + ", ".join(f"{t.rsplit('::', 1)[-1]} {o}" for t, o in zip(m.tests, outcomes)), flush=True)
            bad += not caught
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
