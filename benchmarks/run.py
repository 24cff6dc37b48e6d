"""nnlab's benchmark suite: each benchmark measures nnlab and its baseline in this one run.

    python benchmarks/run.py [--quick] [--only B1,B3,...] [--repeats N] [--json results.json | --save]

    B1  seed-cnn training throughput: nnlab.train vs the article's plain loop (+ fast switches)
    B2  time to 92% Fashion-MNIST accuracy: the fmnist-speedrun recipe vs a careful plain loop, same seeds
    B3  gpt-shakespeare training tokens/s: nnlab.train (fp32, auto, compile) vs a plain nanoGPT loop, and
        time to the val loss the plain loop ends its schedule at
    B4  sampling: KV cache vs recomputing the context, 500 new tokens, two models, greedy identity check
    B5  inference: batch-1 latency and batch-256 throughput, eager vs torch.compile vs bf16
    B6  traditional ML: the six scikit-learn baselines on full Fashion-MNIST, fitting time against 10 minutes
    B7  ONNX export of a trained seed-cnn: agreement, int8 accuracy, eager PyTorch vs onnxruntime fp32 / int8
    B8  nnlab serve under load: seed-cnn classify over HTTP, 32 clients, batched vs one at a time
    B9  nnlab serve under a bounded load: classify and generate, 1 and 32 clients, p50/p99, goals
    B10 DP-SGD training speed: dp-cnn private, clipping only and non-private, with a step's breakdown
    B11 attack cost: PGD-10 and FGSM on 1,000 seed-cnn test images, against a 30 s budget

The header names the processor, its bf16 support, torch, threads, and the matmul peak measured
here, against which every MFU is computed. --quick is a smoke test (tiny step counts, one repeat,
one thread): its figures say that the code runs, not how fast. --save (what `make bench` runs)
writes the whole suite's results to benchmarks/results-<kind>.json, the processor kind named
from the CPU's flags (common.processor_kind); benchmarks/README.md says how each benchmark works.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
import warnings

import torch

import common
from nnlab.errors import NnlabError

BENCHMARKS = {"B1": "b1_cnn", "B2": "b2_speedrun", "B3": "b3_gpt", "B4": "b4_generate", "B5": "b5_infer",
              "B6": "b6_baselines", "B7": "b7_export", "B8": "b8_serve",
              "B9": "b9_load", "B10": "b10_privacy", "B11": "b11_attack"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: seconds per benchmark, not real figures")
    p.add_argument("--only", help="comma-separated benchmarks, e.g. B1,B4 (default: all)")
    p.add_argument("--repeats", type=common.positive_int, help="runs per measurement (default 3; --quick: 1)")
    p.add_argument("--threads", type=common.positive_int,
                   help="torch threads (default: torch's; --quick: 1, because on a shared CPU a second thread "
                   "waiting for a busy core slows small ops many times over)")
    p.add_argument("--json", type=common.output_file,
                   help="write all results, machine and command line to this file")
    p.add_argument("--save", action="store_true",
                   help="write the whole suite's results to benchmarks/results-<processor kind>.json")
    a = p.parse_args(argv)
    if a.save and (a.quick or a.only or a.json):
        p.error("--save writes a processor kind's results file from one full run: not with --quick, --only or --json")
    only = [s.strip().upper() for s in a.only.split(",")] if a.only else list(BENCHMARKS)
    unknown = [s for s in only if s not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown benchmark {unknown[0]}; choose from {', '.join(BENCHMARKS)}")
    repeats = a.repeats or (1 if a.quick else 3)
    threads = a.threads or (1 if a.quick else None)
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*TensorFloat32.*")

    device = common.pick_device()
    if a.save:
        kind = common.processor_kind(common.cpu_flags(), device.type)
        try:
            a.json = common.output_file(str(common.ROOT / "benchmarks" / f"results-{kind}.json"))
        except argparse.ArgumentTypeError as e:
            p.error(f"--save: {e}")
    machine = common.machine(device, a.quick)
    common.print_header(machine, a.quick, repeats)
    ctx = common.Ctx(quick=a.quick, repeats=repeats, device=device, machine=machine)
    results = {}
    for key in only:
        print(flush=True)
        t0 = time.perf_counter()
        try:
            res = importlib.import_module(BENCHMARKS[key]).run(ctx)
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"== {res['title']}")
            common.print_table(res["columns"], res["rows"])
            for note in res["notes"]:
                print(f"   {note}")
            print(f"   ({key} took {res['wall_s']:.0f} s in all)", flush=True)
        except Exception as e:  # report it and go on: the other benchmarks still have something to say
            if not isinstance(e, NnlabError):  # a user's error (no dataset, say) needs its line, not a traceback
                traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
            print(f"== {key} FAILED: {res['error']}", flush=True)
        results[key] = res
        if a.json:  # after every benchmark, so a run cut short still leaves what it finished
            try:
                common.write_json(a.json, machine, a.quick, repeats, results)
            except OSError as e:  # a full disk, say: stop, rather than run on with nowhere to keep the results
                print(f"run.py: error: cannot write {a.json}: {e.strerror or e}", file=sys.stderr)
                return 2
    failed = [k for k, r in results.items() if "error" in r]
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    if a.json:
        print(f"wrote {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
