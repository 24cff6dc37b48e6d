"""Write the README's tables of figures from the results files committed in the repo.

    python scripts/readme_tables.py [--check] [--root DIR]

recipes:    one row per shipped recipe, from src/nnlab/recipes/curves/<recipe>.json (its reference
            curves: the final evaluation's mean [min-max] over seeds, training seconds,
            precision and processor).
benchmarks: one row per measurement, one column per benchmarks/results-<kind>.json (one
            `make bench` run on a processor kind).

Each table sits in README.md between `<!-- NAME:begin -->` and `<!-- NAME:end -->` lines, and is
rewritten whole, so no figure in it is typed by hand. --check writes nothing and exits 1 when
README.md differs from what this script would write (tests/test_readme.py runs it).
Standard library only: it needs neither torch nor nnlab.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASH = "—"  # a cell the file has no figure for

RECIPE_ORDER = ["seed-cnn", "seed-cnn-fast", "cnn", "fmnist-speedrun", "vit", "mlp-regression", "mlp-tabular",
                "gpt-shakespeare", "gpt-shakespeare-fast", "gpt-shakespeare-speedrun"]
# metric in a curve's "final" -> (words, how a value is written, scale)
METRICS = {"test_accuracy": ("test accuracy", "{:.2f}", 100), "val_loss": ("val loss", "{:.4f}", 1),
           "test_mse": ("test MSE", "{:,.0f}", 1), "test_loss": ("test loss", "{:.4f}", 1)}
# Benchmarks that have always run each side in a fresh process; the others say so in their results
# ("fresh_processes"), and a cell from a file written before they did is marked.
ALWAYS_FRESH = {"B1", "B3"}
KIND_ORDER = ["xeon-amx", "avx512-bf16", "avx512", "avx2", "gpu"]
KIND_LABELS = {"xeon-amx": "Intel with AMX", "avx512-bf16": "AVX512 bf16, no AMX", "avx512": "AVX512, no bf16",
               "avx2": "AVX2 only", "gpu": "CUDA GPU"}


class TableError(Exception):
    """A results file this script cannot read figures from."""


# ---- recipes ---------------------------------------------------------------------------------------

def seconds(s: dict) -> str:
    """'101 [100-102]', '18.7 [17.1-21.5]', '0.20 [0.14-0.26]': digits by the size of the mean."""
    spec = ",.0f" if s["mean"] >= 100 else ".1f" if s["mean"] >= 10 else ".2f"
    return f"{s['mean']:{spec}} [{s['min']:{spec}}-{s['max']:{spec}}]"


def recipe_row(name: str, path: Path) -> list[str]:
    if not path.exists():
        return [f"`{name}`", f"no reference curve yet: `python benchmarks/curves.py {name}`", "", "", "", ""]
    doc = json.loads(path.read_text())
    final = doc["final"]
    metric = next((m for m in METRICS if m in final), None)
    if metric is None:
        raise TableError(f"{path}: its final figures hold none of {', '.join(METRICS)}")
    words, spec, scale = METRICS[metric]
    f = final[metric]
    unit = "%" if scale == 100 else ""
    result = (f"{words} {spec.format(f['mean'] * scale)}{unit} "
              f"[{spec.format(f['min'] * scale)}-{spec.format(f['max'] * scale)}]")
    train_s = doc.get("train_seconds") or final.get("train_seconds")
    label = f"`{name}`" + "".join(f" `--set {o}`" for o in doc.get("overrides", []))
    return [label, result, " ".join(str(s) for s in doc["seeds"]), seconds(train_s) if train_s else DASH,
            doc["precision"], doc["cpu"]]


def recipes_table(root: Path) -> str:
    recipes = root / "src" / "nnlab" / "recipes"
    curves = recipes / "curves"
    names = {p.stem for p in recipes.glob("*.yaml")} | {p.stem for p in curves.glob("*.json")}
    ordered = [n for n in RECIPE_ORDER if n in names] + sorted(names - set(RECIPE_ORDER))
    rows = [recipe_row(n, curves / f"{n}.json") for n in ordered]
    return markdown(["recipe", "reaches: mean [min-max] over seeds", "seeds", "training s", "precision",
                     "processor"], rows)


# ---- benchmarks ------------------------------------------------------------------------------------

def ratio(s: dict | None) -> str:
    if not s:
        return DASH
    out = f"{s['median']:.2f}x"
    return out + (f" [{s['min']:.2f}-{s['max']:.2f}]" if s.get("n", 1) > 1 else "")


def variant(b: dict, name: str) -> dict | None:
    res = b.get("results", {}).get(name)
    return None if res is None or "error" in res else res


def b1(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B1")
    shipped, best = (variant(b, n) if b else None for n in ("nnlab seed-cnn (recipe as shipped)",
                                                             "nnlab + channels_last + precision=auto"))
    if not (shipped and best):
        return None
    return f"{ratio(shipped['ratio_vs_baseline'])}; {ratio(best['ratio_vs_baseline'])} ({best['precision']})"


def b2(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B2")
    if not b or "rule" not in b:  # measured before both sides had one success rule
        return None
    reached = f"seeds at 92%: nnlab {b['nnlab']['reached']}, plain {b['plain']['reached']}"
    return (f"{b['time_ratio']:.2f}x; " if "time_ratio" in b else "") + reached


def b3_speed(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B3")
    shipped, best = (variant(b, n) if b else None for n in ("nnlab gpt-shakespeare (fp32, as shipped)",
                                                             "nnlab + compile + precision=auto"))
    if not (shipped and best):
        return None
    return f"{ratio(shipped['ratio_vs_baseline'])}; {ratio(best['ratio_vs_baseline'])} ({best['precision']})"


def b3_target(doc: dict) -> str | None:
    tt = doc["benchmarks"].get("B3", {}).get("results", {}).get("time_to_target")
    if not tt or "target_rule" not in tt:  # measured against a fixed target, not the plain loop's own end
        return None
    return ratio(tt["ratio"]) if "ratio" in tt else "not reached"


def b4(key: str, path: str | None = None):
    """B4's ratio for a model: the cache's (or exact sampling's) speed-up, or that of one `path`."""
    def cell(doc: dict) -> str | None:
        b = doc["benchmarks"].get("B4")
        if not b:
            return None
        if "models" in b:
            m = b["models"].get(key)
            if not m or (key == "gpt-shakespeare" and "baseline" not in m):  # older files: cache vs recompute
                return None
            if path:
                res = m["results"].get(path)
                return ratio(res["ratio_vs_sample_py"]) if res else None
            return ratio(m["cache_speedup"])
        # One model only: the random GPT with a 1,024-token context.
        return ratio(b["cache_speedup"]) if key == "random-1024" and b["config"].get("block_size") == 1024 else None
    return cell


def b5(model: str):
    def cell(doc: dict) -> str | None:
        res = doc["benchmarks"].get("B5", {}).get("results", {})
        comp, bf16 = res.get(f"{model} / torch.compile fp32"), res.get(f"{model} / eager bf16 autocast")
        if not (comp or bf16):
            return None
        return "; ".join([f"compile {ratio(comp['ratio_vs_eager'])}" if comp else "compile " + DASH,
                          f"bf16 {ratio(bf16['ratio_vs_eager'])}" if bf16 else "bf16: not native"])
    return cell


def b6(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B6")
    if not b or "error" in b:
        return None
    best = b["best"]
    return (f"{best['model']} {100 * best['test_accuracy']:.2f}%; all six fitted in {b['fit_s_total']:,.0f} s, "
            + ("within budget" if b["within_budget"] else "OVER budget"))


def b7(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B7")
    if not b or "error" in b:
        return None
    res, agree = b["results"], b["agreement"]
    fp32, int8 = (ratio(res[f"onnxruntime {p}"]["ratio_vs_eager"]) for p in ("fp32", "int8"))
    return (f"fp32 agrees {100 * agree['fp32_top1_agreement']:.2f}%; b256 fp32 {fp32}, int8 {int8} "
            f"({100 * agree['int8_accuracy_change']:+.2f} points)")
def b8(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B8")  # absent from results files written before B8 existed
    if not b or "error" in b:
        return None
    batched, single = b["results"]["batched"], b["results"]["one at a time"]
    return (f"{b['batching_speedup']:.2f}x ({batched['median']['requests_per_s']:,.0f} vs "
            f"{single['median']['requests_per_s']:,.0f} requests/s); 1 client p50 {batched['alone_p50_ms']:.1f} ms")


def b9(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B9")  # absent from results files written before B9 existed
    if not b or "error" in b:
        return None
    res, n = b["results"], b["config"]["clients"]
    batched = res[f"classify, batched, {n} clients"]["requests_per_s"]["median"]
    generate = res[f"generate, {n} clients"]
    return (f"p50 {res['classify, batched, 1 client']['p50_ms']['median']:.1f} ms; {ratio(b['batching_speedup'])} "
            f"({batched:,.0f} requests/s); generate {generate['tokens_per_s']['median']:,.0f} tokens/s; "
            f"{b['errors']} errors")


def b10(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B10")
    if not b or "error" in b:
        return None
    res = b["results"]
    return f"{ratio(res['DP-SGD (epsilon 3)']['ratio_vs_non_private'])}; clipping only " \
           f"{ratio(res['clipping only (no noise)']['ratio_vs_non_private'])}"


def b11(doc: dict) -> str | None:
    b = doc["benchmarks"].get("B11")
    if not b or "error" in b:
        return None
    s = b["results"]["pgd_s"]
    return f"{s['median']:.1f} s [{s['min']:.1f}-{s['max']:.1f}]"


BENCH_ROWS = [
    ("B1 seed-cnn training speed over the article's plain loop: recipe as shipped; + channels_last + "
     "precision=auto", b1),
    ("B2 wall time to 92% test accuracy, `fmnist-speedrun` / a careful plain loop, every seed at 92% "
     "(lower is better)", b2),
    ("B3 gpt-shakespeare training speed over a nanoGPT-style loop: as shipped; compile + precision=auto", b3_speed),
    ("B3 time to the val loss the plain loop ends its schedule at, `gpt-shakespeare-speedrun` / the plain "
     "loop (lower is better)", b3_target),
    ("B4 sampling speed, KV cache over recomputing: random GPT, block_size 1024", b4("random-1024")),
    ("B4 gpt-shakespeare sampling over nanoGPT's sample.py: exact (same tokens)", b4("gpt-shakespeare")),
    ("B4 the same with context_shift=16 (cached; shorter contexts)",
     b4("gpt-shakespeare", "nnlab context_shift=16")),
    ("B5 seed-cnn inference, batch-256 throughput over eager fp32", b5("seed-cnn")),
    ("B5 the same for gpt-shakespeare's model", b5("gpt baby")),
    ("B6 traditional ML on full Fashion-MNIST (not a ratio): the best baseline's test accuracy; seconds to fit "
     "all six, against a budget of ten minutes", b6),
    ("B7 seed-cnn exported to ONNX: fp32 top-1 agreement with PyTorch; batch-256 onnxruntime throughput over "
     "eager PyTorch, fp32 and int8 (int8's accuracy change)", b7),
    ("B8 `nnlab serve` seed-cnn classify, 32 clients: batched requests/s over one at a time; one client's p50 "
     "latency", b8),
    ("B9 `nnlab serve` under a bounded load: seed-cnn classify p50 at 1 client (goal <= 5 ms); at 32 clients, "
     "batched over one at a time (goal >= 2x); gpt generate tokens/s at 32 clients; errors", b9),
    ("B10 DP-SGD training speed (dp-cnn) over the same model trained normally", b10),
    ("B11 PGD-10 on 1,000 seed-cnn test images at eps 0.1, seconds (budget 30 s; not a ratio)", b11),
]


def results_files(root: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted((root / "benchmarks").glob("results-*.json")):
        doc = json.loads(path.read_text())
        if doc.get("quick"):
            raise TableError(f"{path.relative_to(root)} is a --quick run: its figures only say the code runs; "
                             "delete it or replace it with a `make bench` run")
        docs[path.stem.removeprefix("results-")] = doc
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return dict(sorted(docs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def benchmarks_table(root: Path) -> str:
    docs = results_files(root)
    if not docs:
        return "No results file yet: `make bench` writes `benchmarks/results-<kind>.json`.\n"
    rows = []
    for label, cell in BENCH_ROWS:
        try:
            rows.append([label] + [cell(doc) or DASH for doc in docs.values()])
        except (KeyError, TypeError) as e:
            raise TableError(f"{label.split()[0]}: a results file lacks {e}") from None
    lines = [markdown(["benchmark: nnlab's ratio, median [min-max] over repeats"]
                      + [f"{KIND_LABELS.get(k, k)} (`{k}`)" for k in docs], rows)]
    if any(DASH in r for r in rows):
        lines.append(f"{DASH}: that file holds no figure measured the way the benchmark now measures it (it was "
                     "written before the method changed, or the variant failed); the next `make bench` on that "
                     "processor kind fills it in.\n")
    for kind, doc in docs.items():
        m = doc["machine"]
        merged = sorted({b for entry in doc.get("merged", []) for b in entry.get("replaces", [])})
        shared = [k for k, b in doc["benchmarks"].items()
                  if k not in ALWAYS_FRESH and "error" not in b and not b.get("fresh_processes")]
        lines.append(f"- `benchmarks/results-{kind}.json`: {m['processor']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''}, "
                     f"torch {m['torch']}, written {doc['written'][:10]}"
                     + (f"; {', '.join(merged)} from later runs of `--only` (its `merged` list says why)"
                        if merged else "")
                     + (f"; {', '.join(shared)} ran both sides in one process" if shared else ""))
    return "\n".join(lines) + "\n"


# ---- the README --------------------------------------------------------------------------------------

def markdown(columns: list[str], rows: list[list[str]]) -> str:
    cell = lambda c: str(c).replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- attack, defend, audit -------------------------------------------------------------------------
# Each from benchmarks/<study>-<kind>.json, written by benchmarks/<study>.py on one processor kind.

def pct(v) -> str:
    return DASH if v is None else f"{100 * v:.2f}%"


def privacy_utility(doc: dict) -> list[list[str]]:
    cells = []
    for r in doc["runs"]:
        if r["target_epsilon"] is None:
            cells.append(f"{r['run'].replace('-', ' ')} {pct(r['test_accuracy'])}")
        else:
            cells.append(f"epsilon {r['target_epsilon']:g} {pct(r['test_accuracy'])}")
    pub = doc["published"]
    return [["`dp-cnn` test accuracy by privacy budget (delta 1e-5; DP-SGD, Opacus)",
             "; ".join(cells) + f" (published: {pct(pub['test_accuracy'])} at epsilon {pub['epsilon']:g})"]]


def privacy_audit(doc: dict) -> list[list[str]]:
    rows = []
    for name, r in doc["models"].items():
        eps = "no DP" if r["epsilon_rdp"] is None else f"DP, epsilon {r['epsilon_rdp']:.2f}"
        attacks = "; ".join(f"{k.replace('_', ' ')} AUC {a['auc']:.3f}, TPR {pct(a['tpr_at_0.1%_fpr'])}"
                            for k, a in r["attacks"].items())
        rows.append([f"membership inference on `dp-cnn`'s model, {eps} (accuracy {pct(r['test_accuracy'])})",
                     attacks + " at 0.1% FPR"])
    return rows


def backdoor(doc: dict) -> list[list[str]]:
    cells = []
    for r in doc["rows"]:
        spectral = r["detection"].get("spectral", {}).get("target_class", {})
        found = f", spectral recall {pct(spectral.get('recall'))}" if r["rate"] else ""
        cells.append(f"rate {100 * r['rate']:g}%: clean {pct(r['test_accuracy'])}, attack success "
                     f"{pct(r['attack_success_rate'])}{found}")
    return [[f"BadNets backdoor in `{doc['recipe']}` (target class {doc['target']})", "; ".join(cells)]]


def robustness(doc: dict) -> list[list[str]]:
    at = doc["attack"]
    cells = [f"`{name}` clean {pct(m['attacked_clean_accuracy'])}, under attack "
             + ", ".join(f"eps {e} {pct(v)}" for e, v in m["under_attack"].items())
             for name, m in doc["models"].items()]
    return [[f"adversarial training: PGD-{at['steps']} x {at['restarts']} restarts on {at['samples']:,} test images",
             "; ".join(cells)]]


STUDIES = {"privacy-utility": privacy_utility, "privacy-audit": privacy_audit, "backdoor": backdoor,
           "robustness": robustness}


def security_table(root: Path) -> str:
    rows = []
    for study, build in STUDIES.items():
        for path in sorted((root / "benchmarks").glob(f"{study}-*.json")):
            doc = json.loads(path.read_text())
            processor = doc.get("processor") or doc.get("cpu") or path.stem.removeprefix(f"{study}-")
            for row in build(doc):
                rows.append(row + [f"`{path.relative_to(root)}` ({processor})"])
    if not rows:
        return "No results file yet: `benchmarks/README.md` names the scripts that write them.\n"
    return markdown(["measurement", "figures", "from"], rows)


TABLES = {"recipes": recipes_table, "benchmarks": benchmarks_table, "security": security_table}


def render(readme: str, root: Path) -> str:
    for name, build in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:begin[^>]*-->\n)(.*?)(<!-- {name}:end -->)", re.S)
        if len(pattern.findall(readme)) != 1:
            raise TableError(f"README.md needs exactly one <!-- {name}:begin --> ... <!-- {name}:end --> pair")
        table = build(root)
        readme = pattern.sub(lambda m: m.group(1) + table + m.group(3), readme)
    return readme


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="readme_tables.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not what this script writes")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    a = p.parse_args(argv)
    path = a.root / "README.md"
    old = path.read_text(encoding="utf-8")
    try:
        new = render(old, a.root)
    except (TableError, OSError, json.JSONDecodeError) as e:
        p.exit(2, f"readme_tables.py: error: {e}\n")
    if a.check:
        if new != old:
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), "README.md", "generated", lineterm="")
            print("\n".join(diff))
            print("readme_tables.py: README.md's tables differ from the results files: "
                  "run `python scripts/readme_tables.py`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
