"""B9: a bounded load test of `nnlab serve`: seed-cnn classify and gpt generate, at 1 and 32 clients.

    python benchmarks/run.py --only B9                     # in the suite (trains its own two runs)
    python benchmarks/b9_load.py [--cnn-run RUN] [--gpt-run RUN] [--requests N] [--json FILE]

The servers are the real command, `nnlab serve RUN --port P --max-batch N`, each a process of its own
on 127.0.0.1 (B8's start_server), for a seed-cnn run folder and a gpt-shakespeare run folder: the
ones given, or else trained here for one step (the weights do not change the cost: a classify request
is one forward pass, and a generate request always samples max_new_tokens tokens). Clients are
threads in this process (B8's load): one keep-alive connection each, each waiting for its answer
before sending the next, until the setting's requests are all answered; then the setting ends by
itself. The settings:

    classify   --max-batch 32 (batched) and --max-batch 1 (one at a time), 1 and 32 clients,
               REQUESTS requests each (one 28x28 JSON pixel body)
    generate   1 and 32 clients, GENERATE_REQUESTS requests each of GENERATE_TOKENS new tokens
               (fewer than classify: 2,000 per setting would add minutes to every repeat on 2 cores)

Per setting and repeat: errors (an answer other than 200, or a broken connection), p50 and p99 of
each request's wall time (send to whole answer), requests/s over the setting's wall time, and the
server process's CPU time per request (user + system, from /proc); generate also gives tokens/s. The
goals of issue 23 are printed beside the figures: classify p50 at most 5 ms at one client (the
batched server, as `nnlab serve` runs by default), and at 32 clients the batched server at least 2x
the requests/s of one-at-a-time handling. The client shares the cores with the server, so requests/s
is a figure for this client and machine, not the server's ceiling.
--quick: 1 and 4 clients, 50 classify and 8 generate requests of 4 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from b8_serve import load, make_run, start_server
from common import Ctx, fmt, output_file, positive_int, quiet, summarize

REQUESTS, GENERATE_REQUESTS, GENERATE_TOKENS, CLIENTS = 2000, 400, 16, 32
QUICK = {"requests": 50, "generate_requests": 8, "generate_tokens": 4, "clients": 4}
PROMPT = "First Citizen:"
GOAL_P50_MS, GOAL_BATCHING = 5.0, 2.0


def make_gpt_run(folder: Path) -> Path:
    import nnlab

    with quiet():
        return nnlab.train("gpt-shakespeare", {"train.max_steps": 1, "train.eval_iters": 1, "train.warmup_steps": 0},
                           out=str(folder / "gpt"))


def settings(size: dict) -> list[dict]:
    """Every setting: what it asks, of which server (max_batch), with how many clients and requests."""
    out = []
    for max_batch, server in ((32, "batched"), (1, "one at a time")):
        for clients in (1, size["clients"]):
            out.append({"name": f"classify, {server}, {clients} client{'s' * (clients > 1)}", "workload": "classify",
                        "max_batch": max_batch, "clients": clients, "requests": size["requests"]})
    for clients in (1, size["clients"]):
        out.append({"name": f"generate, {clients} client{'s' * (clients > 1)}", "workload": "generate",
                    "max_batch": 1, "clients": clients, "requests": size["generate_requests"]})
    return out


def bodies(size: dict) -> dict[str, tuple[str, bytes]]:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28)).tolist()
    generate = {"prompt": PROMPT, "max_new_tokens": size["generate_tokens"], "temperature": 0.8, "seed": 0}
    return {"classify": ("/v1/classify", json.dumps({"pixels": pixels}).encode()),
            "generate": ("/v1/generate", json.dumps(generate).encode())}


def run(ctx: Ctx, cnn_run: Path | None = None, gpt_run: Path | None = None, size: dict | None = None) -> dict:
    size = size or (QUICK if ctx.quick else {"requests": REQUESTS, "generate_requests": GENERATE_REQUESTS,
                                             "generate_tokens": GENERATE_TOKENS, "clients": CLIENTS})
    requests = bodies(size)
    measured: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"classify": cnn_run or make_run(Path(tmp)), "generate": gpt_run or make_gpt_run(Path(tmp))}
        plan = settings(size)
        for server in sorted({(s["workload"], s["max_batch"]) for s in plan}, key=lambda k: (k[0], -k[1])):
            path, body = requests[server[0]]
            proc, port = start_server(runs[server[0]], server[1], ctx.machine.get("threads"))
            try:
                load(port, 2, 4 if server[0] == "generate" else 50, body, path)  # warm-up: first calls, pools
                for _ in range(ctx.repeats):  # the settings of one server in turn within each repeat
                    for s in plan:
                        if (s["workload"], s["max_batch"]) == server:
                            cpu0 = server_cpu_s(proc.pid)
                            res = load(port, s["clients"], s["requests"], body, path)
                            cpu1 = server_cpu_s(proc.pid)
                            res["server_cpu_ms"] = None if cpu0 is None else 1000 * (cpu1 - cpu0) / s["requests"]
                            measured.setdefault(s["name"], []).append(res)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return summary(plan, measured, size, ctx)


def server_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) the server process has used so far; None where /proc has no
    answer (not Linux). Per request, it moves less with other jobs on a shared host than requests/s."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in clock ticks


def summary(plan: list[dict], measured: dict[str, list[dict]], size: dict, ctx: Ctx) -> dict:
    results, rows = {}, []
    for s in plan:
        xs = measured[s["name"]]
        res = {**s, "errors": sum(x["errors"] for x in xs), "p50_ms": summarize(x["p50_ms"] for x in xs),
               "p99_ms": summarize(x["p99_ms"] for x in xs),
               "requests_per_s": summarize(x["requests_per_s"] for x in xs),
               "server_cpu_ms_per_request": (summarize(x["server_cpu_ms"] for x in xs)
                                             if all(x["server_cpu_ms"] is not None for x in xs) else None),
               "runs": xs}
        if s["workload"] == "generate":
            res["tokens_per_s"] = summarize(x["requests_per_s"] * size["generate_tokens"] for x in xs)
        results[s["name"]] = res
    one = "classify, batched, 1 client"
    many = [results[f"classify, {m}, {size['clients']} clients"]["requests_per_s"]["values"]
            for m in ("batched", "one at a time")]
    batching = summarize(b / u for b, u in zip(*many))  # repeats paired, as every ratio in the suite
    p50 = results[one]["p50_ms"]["median"]
    goals = {"classify_p50_ms_1_client": {"value": p50, "goal": f"<= {GOAL_P50_MS:g} ms", "met": p50 <= GOAL_P50_MS},
             "batching_speedup": {"value": batching["median"], "goal": f">= {GOAL_BATCHING:g}x",
                                  "met": batching["median"] >= GOAL_BATCHING}}
    for name, res in results.items():
        goal = ""
        if name == one:
            goal = f"p50 goal <= {GOAL_P50_MS:g} ms: {'met' if goals['classify_p50_ms_1_client']['met'] else 'NOT met'}"
        elif name == f"classify, batched, {size['clients']} clients":
            goal = (f"{fmt(batching, '.2f', suffix='x')} one at a time's requests/s; goal >= {GOAL_BATCHING:g}x: "
                    f"{'met' if goals['batching_speedup']['met'] else 'NOT met'}")
        elif "tokens_per_s" in res:
            goal = f"{fmt(res['tokens_per_s'])} tokens/s"
        rows.append([name, str(res["max_batch"]), f"{res['requests']:,}", fmt(res["p50_ms"], ".2f"),
                     fmt(res["p99_ms"], ".1f"), fmt(res["requests_per_s"]),
                     fmt(res["server_cpu_ms_per_request"], ".2f"),
                     str(res["errors"]), goal])
    errors = sum(r["errors"] for r in results.values())
    notes = [f"{ctx.repeats} run(s) per setting, median [min-max]; each setting stops after its requests; generate: "
             f"{size['generate_requests']:,} requests of {size['generate_tokens']} new tokens after {PROMPT!r}, "
             "temperature 0.8",
             f"errors in all: {errors}" + ("" if errors == 0 else "  <-- NOT ZERO"),
             "client and server share this machine's cores (see benchmarks/README.md)"]
    if ctx.quick:
        notes.append("--quick: a smoke test, not figures")
    return {
        "fresh_processes": True,  # each server is a process of its own
        "title": f"B9 nnlab serve under a bounded load on 127.0.0.1: seed-cnn classify and gpt generate, "
                 f"1 and {size['clients']} clients",
        "notes": notes,
        "columns": ["setting", "max batch", "requests", "p50 ms", "p99 ms", "requests/s", "server CPU ms/request",
                    "errors", "goal"],
        "rows": rows,
        "results": results,
        "goals": goals,
        "batching_speedup": batching,
        "errors": errors,
        "config": size,
    }


def run_folder(text: str) -> Path:
    """argparse type: a finished run folder (one with model.json)."""
    from nnlab.runfolder import MODEL_INFO

    path = Path(text)
    if not (path / MODEL_INFO).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a finished run folder (no {MODEL_INFO})")
    return path


def main(argv=None) -> int:
    import torch

    from common import print_table
    from nnlab.runfolder import atomic_write_text

    p = argparse.ArgumentParser(prog="b9_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cnn-run", type=run_folder, help="a seed-cnn run folder to serve (default: train one step)")
    p.add_argument("--gpt-run", type=run_folder, help="a gpt run folder to serve (default: gpt-shakespeare, one step)")
    p.add_argument("--requests", type=positive_int, default=REQUESTS,
                   help=f"classify requests per setting ({REQUESTS})")
    p.add_argument("--generate-requests", type=positive_int, default=GENERATE_REQUESTS,
                   help=f"generate requests per setting ({GENERATE_REQUESTS})")
    p.add_argument("--generate-tokens", type=positive_int, default=GENERATE_TOKENS,
                   help=f"max_new_tokens of each generate request ({GENERATE_TOKENS})")
    p.add_argument("--clients", type=positive_int, default=CLIENTS, help=f"concurrent clients besides 1 ({CLIENTS})")
    p.add_argument("--repeats", type=positive_int, default=1, help="runs per setting (1)")
    p.add_argument("--threads", type=positive_int, help="OMP_NUM_THREADS of the servers (default: torch's)")
    p.add_argument("--json", type=output_file, help="write the results to this file")
    a = p.parse_args(argv)
    size = {"requests": a.requests, "generate_requests": a.generate_requests, "generate_tokens": a.generate_tokens,
            "clients": a.clients}
    ctx = Ctx(quick=False, repeats=a.repeats, device=torch.device("cpu"), machine={"threads": a.threads})
    res = run(ctx, a.cnn_run, a.gpt_run, size)
    print(f"== {res['title']}")
    print_table(res["columns"], res["rows"])
    for note in res["notes"]:
        print(f"   {note}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"command": " ".join(sys.argv), "B9": res}, indent=2))
        print(f"wrote {a.json}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
