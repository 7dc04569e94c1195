"""Speculation, in one place: how a draft is made, which drafts a step verifies, and what is accepted.

The engine (backend/engine.py) calls one object, `speculator.Speculator`, built at load by
`build.build_speculator`:
- drafts are made by three sources: Medusa's heads (`heads.py` holds the weights, `head_compute.py`
  runs them on the CPU or the GPU, `tree.py` the draft path), prompt lookup (`lookup.py`) and the
  tokens a grammar forces;
- the plan (`draft_plan.py`, pure functions) picks per sequence and step the draft and length worth a
  verify decode, from each source's live acceptance and this machine's decode costs (`costs.py`,
  measured at load);
- a verify decode has at most `verify_rows.VerifyLimit.rows` rows: under EXACTNESS=strict the row
  counts whose logits match one-by-one decoding to the bit, measured at load;
- acceptance (`verify.py`) walks the verify decode's rows and keeps each row's token, chosen exactly
  as plain decoding chooses it, while it confirms the draft.
Head training and its corpus (backend/medusa/) are apart from this serving runtime.
"""
