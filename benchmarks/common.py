"""Shared pieces of the benchmark suite: the machine header, the measured matmul peak, timing
summaries, analytic FLOP counts, and the JSON file.

Every speed figure in this suite is a ratio or a utilisation measured in the same run on the same
machine (STYLE.md rule 11): MFU = achieved model FLOP/s / the matmul peak this script measured a
moment earlier for the precision in use, never a datasheet number.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from nnlab.runfolder import atomic_write_text, file_in_the_way
from nnlab.train.precision import cpu_flags, cpu_name, native_bf16

ROOT = Path(__file__).resolve().parent.parent
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass
class Ctx:
    """What every benchmark gets: the mode, the device and the measured peaks."""

    quick: bool
    repeats: int
    device: torch.device
    machine: dict = field(default_factory=dict)

    def steps(self, quick: int, full: int) -> int:
        # A GPU step is much shorter than a CPU one: take more of them so the steady state is not noise.
        return quick if self.quick else full * (4 if self.device.type == "cuda" else 1)

    def peak(self, precision: str) -> float:
        """Measured matmul peak in FLOP/s for "fp32" or "bf16" (bf16: only where it is native)."""
        gflops = self.machine["peak_gflops"][precision]
        if gflops is None:
            raise RuntimeError(f"no {precision} matmul peak: {self.machine['native_bf16_reason']}")
        return gflops * 1e9

    @property
    def bf16(self) -> bool:
        return self.machine["native_bf16"]


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds for n calls of fn, with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def median_ms(fn, reps: int) -> float:
    """Milliseconds of one call of fn: the median of `reps` calls after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


# ---- the machine -------------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype, n: int, device: torch.device, reps: int = 5) -> float:
    """Median GFLOP/s of an n x n @ n x n torch.matmul in `dtype` (2n^3 FLOPs each)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)  # the first call pays for allocation and kernel selection
    times = []
    for _ in range(reps):
        times.append(timed(lambda: torch.matmul(a, b), 1, device))
    return 2 * n**3 / statistics.median(times) / 1e9


def processor_kind(flags: set[str], device_type: str = "cpu", arch: str | None = None) -> str:
    """The name of a results file's processor kind (benchmarks/results-<kind>.json), from CPU flags:
    what decides which code paths run, so two machines of one kind give comparable figures."""
    if device_type == "cuda":
        return "gpu"
    if "amx_bf16" in flags:
        return "xeon-amx"  # Intel Sapphire Rapids and later: AMX tiles and AVX-512 bf16
    if "avx512_bf16" in flags:
        return "avx512-bf16"  # native bf16 without AMX: AMD Zen 4 and later, Intel Cooper Lake
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return (arch or platform.machine() or "unknown").lower()


def machine(device: torch.device, quick: bool) -> dict:
    ok, why = native_bf16(device)
    # A GPU needs larger matrices than a CPU to come near its peak.
    n = (2048 if quick else 8192) if device.type == "cuda" else (1024 if quick else 2048)
    return {
        "kind": processor_kind(cpu_flags(), device.type),
        "processor": cpu_name(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type,
        "native_bf16": ok,
        "native_bf16_reason": why,
        "cpu_flags": [f for f in SHOWN_FLAGS if f in cpu_flags()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "peak_matmul_n": n,
        # Emulated bf16 runs a 2048^3 matmul for about a minute and no benchmark runs bf16 there.
        "peak_gflops": {"fp32": matmul_peak(torch.float32, n, device),
                        "bf16": matmul_peak(torch.bfloat16, n, device) if ok else None},
    }


def print_header(m: dict, quick: bool, repeats: int) -> None:
    print(f"# processor: {m['processor']} (kind {m['kind']})" + (f"; GPU: {m['gpu']}" if m["gpu"] else ""))
    print(f"# native bf16: {'yes' if m['native_bf16'] else 'no'} ({m['native_bf16_reason']}); "
          f"CPU flags: {', '.join(m['cpu_flags']) or 'none of ' + ', '.join(SHOWN_FLAGS)}")
    print(f"# torch {m['torch']}, python {m['python']}, {m['threads']} threads, device {m['device']}")
    p = m["peak_gflops"]
    print(f"# measured matmul peak ({m['peak_matmul_n']}x{m['peak_matmul_n']}, median of 5): "
          f"fp32 {p['fp32']:,.0f} GFLOP/s, bf16 " + (f"{p['bf16']:,.0f} GFLOP/s" if p["bf16"] else "not measured (not native)"))
    print(f"# {'QUICK smoke mode (tiny step counts: not real figures)' if quick else 'full mode'}; "
          f"{repeats} repeat(s), shown as median [min-max]")


# ---- summaries and tables ------------------------------------------------------------------------

def summarize(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def fmt(s: dict | None, spec: str = ",.0f", scale: float = 1.0, suffix: str = "") -> str:
    """'1,234 [1,200-1,260]': the median, then the min-max over repeats when there are several."""
    if not s:
        return "-"
    out = format(s["median"] * scale, spec) + suffix
    if s["n"] > 1:
        out += f" [{format(s['min'] * scale, spec)}-{format(s['max'] * scale, spec)}]"
    return out


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    print(line(columns))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def write_json(path: str | Path, m: dict, quick: bool, repeats: int, results: dict) -> None:
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": quick, "repeats": repeats,
           "torch": torch.__version__, "machine": m, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "benchmarks": results}
    atomic_write_text(path, json.dumps(doc, indent=2))


def positive_int(text: str) -> int:
    """argparse type for a count (repeats, threads, epochs): a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def output_file(text: str) -> Path:
    """argparse type for a results file: checked, and its folder made, before any work is done, so
    a bad path fails in a second instead of after a benchmark that ran for minutes."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(blocker)!r} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot make the folder for {text!r}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return path


def keep(raw: dict, name: str, x: dict | None) -> None:
    """Store one repeat's result; a variant that failed (now or earlier) is shown as failed, not half-measured."""
    if x is None:
        raw[name].clear()
    else:
        raw[name].append(x)


def attempt(fn, errors: dict, name: str):
    """fn(), or None with the failure kept in errors[name]: one broken variant does not end the suite."""
    if name in errors:
        return None
    try:
        return fn()
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        return None


def training_table(ctx: Ctx, raw: dict, errors: dict, flops: float, unit: str) -> tuple[dict, list, str]:
    """Results, table rows and a cross-check note of a training benchmark; raw[name] holds one dict
    per repeat, the first name is the baseline, and ratios pair each repeat with the baseline's."""
    names = list(raw)
    base = [x["rate"] for x in raw[names[0]]]
    results, rows = {}, []
    for name in names:
        xs = raw[name]
        if name in errors:
            results[name] = {"error": errors[name]}
            rows.append([name, "-", f"failed: {errors[name]}", "", "", "", ""])
            continue
        prec = xs[0]["precision"]
        res = {"precision": prec, f"{unit}_per_s": summarize(x["rate"] for x in xs),
               "ratio_vs_baseline": summarize(x["rate"] / b for x, b in zip(xs, base)),
               "mfu": summarize(x["rate"] * flops / ctx.peak(prec) for x in xs),
               "warmup_s": summarize(x["warmup_s"] for x in xs), "setup_s": summarize(x["setup_s"] for x in xs)}
        if "loop_rate" in xs[0]:
            res[f"nnlab_logged_{unit}_per_s"] = summarize(x["loop_rate"] for x in xs)
            res["precision_reason"] = xs[0]["precision_reason"]
        results[name] = res
        rows.append([name, prec, fmt(res[f"{unit}_per_s"]), fmt(res["ratio_vs_baseline"], ".2f", suffix="x"),
                     fmt(res["mfu"], ".1f", 100, "%"), fmt(res["warmup_s"], ".2f"), fmt(res["setup_s"], ".1f")])
    gaps = [abs(x["loop_rate"] / x["rate"] - 1) for xs in raw.values() for x in xs if "loop_rate" in x]
    note = ("nnlab timed from outside its loop, at optimizer-step boundaries (torch's global step hook); "
            f"the rate nnlab itself logged for the same steps differs by at most {max(gaps, default=0):.1%}")
    return results, rows, note


def auto_note(res: dict) -> str:
    """What train.precision=auto resolved to in a training result, and why."""
    if "error" in res:
        return "precision=auto: the run failed"
    return f"precision=auto chose {res['precision']}: {res['precision_reason'].removeprefix('auto: ')}"


# ---- FLOP counts ---------------------------------------------------------------------------------

def conv_fc_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds per sample of every Conv2d and Linear in one forward pass of x[:1]. It hooks the
    modules' forward, so count on a model that runs them all: nnlab's fused kernels bypass them."""
    macs = 0

    def count(m, inp, out):
        nonlocal macs
        if isinstance(m, nn.Conv2d):  # each output element: in_channels/groups * kh * kw products
            macs += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return macs


def recipe_gpt_fields(recipe: str) -> dict:
    """The GPTConfig fields a recipe's model section sets (vocab_size comes from the data)."""
    from nnlab.config import load_config
    from nnlab.models.gpt import GPTConfig

    m = load_config(recipe).model
    fields = dict(m) if isinstance(m, dict) else dataclasses.asdict(m)
    return {k: v for k, v in fields.items() if k in GPTConfig.__dataclass_fields__ and k != "vocab_size"}


def gpt_params(model) -> int:
    """nanoGPT's N: all parameters but the position table (the token table is lm_head's, tied)."""
    return sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()


def gpt_train_flops_per_token(model, T: int) -> float:
    """nanoGPT's estimate_mfu: 6N for the matmuls (forward 2N + backward 4N) + 12*L*C*T for attention."""
    c = model.cfg
    return 6 * gpt_params(model) + 12 * c.n_layer * c.n_embd * T


def gpt_forward_flops(model, context_lengths) -> float:
    """Forward FLOPs of one token per context length t: 2N + 4*L*C*t (QK^T and AV over t keys)."""
    c, n = model.cfg, gpt_params(model)
    return sum(2 * n + 4 * c.n_layer * c.n_embd * t for t in context_lengths)


# ---- timing nnlab's own loop from outside --------------------------------------------------------

class StepClock:
    """perf_counter stamps at the end of every optimizer.step() in the process, via torch's global
    optimizer hook: nnlab's loop is timed exactly as it runs, without editing or wrapping it.
    On CUDA the stamps are not synchronised, but nnlab's loop syncs once per step (loss.item()),
    so each stamp lags the device by under one step and differences over many steps cancel it."""

    def __enter__(self):
        self.stamps: list[float] = []
        self._hook = register_optimizer_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc):
        self._hook.remove()


@contextlib.contextmanager
def quiet():
    """Swallow nnlab.train's console lines; they are replayed if the run fails."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        sys.stdout.write(buf.getvalue())
        raise


RESULT = "@@result "  # marks the worker's one output line


def kernels_off() -> None:
    """Switch nnlab's own CPU kernels off for this process (every side runs in a fresh one, see
    `isolated`), so what runs is ATen's; raises if they were already loaded, when it is too late."""
    from nnlab import kernels

    os.environ["NNLAB_NO_KERNELS"] = "1"  # read when the kernels are first asked for
    if kernels.status()["built"]:
        raise RuntimeError("nnlab's kernels were loaded before they could be switched off")


def isolated(ctx: Ctx, fn, *args) -> dict:
    """fn(*args) in a fresh Python process; returns its dict. Each side of a comparison runs alone
    in a new process, as a user's script would: nothing process-wide that one side sets (nnlab
    tunes glibc malloc, compile caches, the thread pool) can speed up or slow down the other.
    fn must live at the top level of a benchmarks/ module and take JSON-able arguments."""
    job = json.dumps({"module": fn.__module__, "fn": fn.__name__, "args": args, "threads": ctx.machine["threads"]})
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, job], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
    raise RuntimeError(f"{fn.__name__} in a subprocess: {lines[-1]}")


def _worker(job: str) -> None:
    spec = json.loads(job)
    torch.set_num_threads(spec["threads"])
    out = getattr(importlib.import_module(spec["module"]), spec["fn"])(*spec["args"])
    print(RESULT + json.dumps(out), flush=True)


def train_quiet(recipe: str, overrides: dict, out: str) -> dict:
    """nnlab.train(recipe) with its console lines swallowed; its summary.json, plus `run_dir`."""
    import nnlab

    with quiet():
        run_dir = nnlab.train(recipe, overrides, out=str(out))
    return {**json.loads((run_dir / "summary.json").read_text()), "run_dir": str(run_dir)}


def trained_or_reused(recipe: str, overrides, run_dir) -> dict:
    """The summary.json of nnlab.train(recipe, overrides) in run_dir, training only when run_dir
    holds no summary.json yet: a study script interrupted midway resumes at its first missing run."""
    import nnlab

    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists():
        print(f"# {run_dir.name}: reusing {run_dir}", flush=True)
    else:
        nnlab.train(recipe, overrides, out=str(run_dir))
    return json.loads((run_dir / "summary.json").read_text())


def read_events(run_dir, event: str) -> list[dict]:
    """The records of one kind ("train" or "eval") from a run's metrics.jsonl."""
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["event"] == event]


def time_nnlab(recipe: str, overrides: dict, warm: int, steady: int, out: str) -> dict:
    """Run nnlab.train(recipe) in-process for warm + steady optimizer steps.

    steady rate: items (samples or tokens) of the last `steady` steps / the time between the step
    stamps that bracket them. warm-up: the first `warm` steps (compilation included), from the
    loop's own first log window (log_every=warm). Evaluation and the checkpoint happen once, after
    the last stamp, so they are in neither figure. `loop_rate` is what nnlab itself logged for the
    same steps, kept as a cross-check."""
    import nnlab
    from nnlab.runfolder import read_config

    total = warm + steady
    ov = {**overrides, "train.max_steps": total, "train.log_every": warm, "train.eval_every": total}
    t_call = time.perf_counter()
    with StepClock() as clock, quiet():
        run_dir = nnlab.train(recipe, ov, out=str(out))
    # The checkpoint at the end may add one more: torch.distributed.checkpoint initialises
    # optimizer state with a step on zero gradients. Only the first `total` stamps are the loop's.
    if len(clock.stamps) < total:
        raise RuntimeError(f"{recipe}: expected {total} optimizer steps, saw {len(clock.stamps)}")
    cfg = read_config(run_dir)
    per_step = cfg.train.batch_size * (cfg.model.block_size if cfg.data.name == "text" else 1)
    windows = [(e["step"], next(v for k, v in e.items() if k.endswith("_per_s"))) for e in read_events(run_dir, "train")]
    warm_s = warm * per_step / windows[0][1]
    loop_s, prev = 0.0, warm
    for step, rate in windows[1:]:
        loop_s, prev = loop_s + (step - prev) * per_step / rate, step
    steady_s = clock.stamps[total - 1] - clock.stamps[warm - 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"rate": steady * per_step / steady_s, "warmup_s": warm_s, "loop_rate": steady * per_step / loop_s,
            "setup_s": clock.stamps[warm - 1] - warm_s - t_call, "precision": summary["precision"],
            "precision_reason": summary["precision_reason"]}


if __name__ == "__main__":  # the worker side of isolated()
    _worker(sys.argv[1])
