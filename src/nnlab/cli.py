"""The `nnlab` command: a table of verbs, each a thin call into the library.

Every option's default lives in the library function it feeds (argparse defaults are None and
unset options are not passed), so a default is declared exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nnlab.errors import NnlabError


def cmd_train(a) -> None:
    from nnlab import train

    if a.resume and a.recipe:
        raise NnlabError("train: give a recipe or --resume RUN_DIR, not both")
    train(a.recipe, a.set, config_file=a.config, out=a.out, resume=a.resume)


def cmd_eval(a) -> None:
    from nnlab import evaluate

    print(json.dumps(evaluate(a.run_dir), indent=2))


def cmd_generate(a) -> None:
    from nnlab.generate import generate_text

    kw = {k: getattr(a, k) for k in ("max_new_tokens", "temperature", "top_k", "seed", "context_shift")
          if getattr(a, k) is not None}
    print(generate_text(a.run_dir, a.prompt, **kw))


def cmd_baselines(a) -> None:
    from rich.console import Console

    from nnlab.analysis.baselines import table, write_baselines
    from nnlab.runfolder import read_json

    kw = {k: getattr(a, k) for k in ("data", "out", "max_fit_rows") if getattr(a, k) is not None}
    if a.models is not None:
        kw["models"] = [m.strip() for m in a.models.split(",") if m.strip()]
    console = Console()
    if not console.is_terminal:  # a file or a pipe: the whole table, never cut to 80 columns
        console = Console(width=120)
    path = write_baselines(a.run, overrides=a.set, say=console.print, **kw)
    console.print(table(read_json(path)))
    console.print(f"wrote {path}")


def cmd_learning_curve(a) -> None:
    from nnlab.analysis.learning_curve import learning_curve

    kw = {k: getattr(a, k) for k in ("fractions", "seeds", "baselines", "out", "min_steps") if getattr(a, k) is not None}
    learning_curve(a.recipe, overrides=a.set, **kw)


def cmd_explain(a) -> None:
    from nnlab.analysis.explain import explain, format_result

    kw = {k: getattr(a, k) for k in ("method", "samples") if getattr(a, k) is not None}
    print(format_result(explain(a.run_dir, **kw)))


def cmd_attack(a) -> None:
    from nnlab.analysis.attack import attack, format_result

    kw = {k: getattr(a, k) for k in ("method", "eps", "steps", "restarts", "samples") if getattr(a, k) is not None}
    print(format_result(attack(a.run_dir, **kw)))


def cmd_audit(a) -> None:
    from nnlab.analysis.audit import audit, format_result

    kw = {k: getattr(a, k) for k in ("samples", "seed", "attack", "shadows") if getattr(a, k) is not None}
    print(format_result(audit(a.run_dir, **kw)))


def cmd_detect_poison(a) -> None:
    from rich.console import Console

    from nnlab.analysis.detect_poison import detect_poison, table

    kw = {k: getattr(a, k) for k in ("method", "expected", "out") if getattr(a, k) is not None}
    result = detect_poison(a.run_dir, **kw)
    console = Console() if Console().is_terminal else Console(width=120)
    console.print(table(result))
    if result["note"]:
        console.print(result["note"])
    console.print(f"wrote {result['path']}")


def cmd_report(a) -> None:
    from nnlab.report import build_report

    print(build_report(a.run_dir))


def cmd_predict(a) -> None:
    from rich.console import Console

    from nnlab.predict import predict, table

    kw = {k: getattr(a, k) for k in ("prompt", "top_k", "invert", "max_new_tokens", "temperature", "seed")
          if getattr(a, k) is not None}
    result = predict(a.run_dir, a.files, **kw)
    if a.json:
        print(json.dumps(result, indent=2))
    elif result["task"] == "text":
        print(result["text"])
    else:
        console = Console()
        Console(width=max(console.width, 120) if console.is_terminal else 160).print(table(result))


def cmd_export(a) -> None:
    from nnlab.export import export

    kw = {k: getattr(a, k) for k in ("format", "quantize", "out") if getattr(a, k) is not None}
    print(json.dumps(export(a.run_dir, **kw), indent=2))


def cmd_serve(a) -> None:
    from nnlab.serve import serve

    kw = {k: getattr(a, k) for k in ("host", "port", "token", "max_batch", "backend") if getattr(a, k) is not None}
    if a.max_new_tokens is not None:
        kw["max_new_tokens_cap"] = a.max_new_tokens
    serve(a.run_dir, **kw)


def cmd_recipes(a) -> None:
    from nnlab.config import recipe_dict, recipe_names

    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:{width}s}  {recipe_dict(name).get('description', '')}")


def cmd_info(a) -> None:
    from nnlab.info import format_machine_info, machine_info

    print(format_machine_info(machine_info()))


def cmd_keys(a) -> None:
    from nnlab.config import key_groups

    groups = key_groups(a.model)
    width = [max(len(row[i]) for _, rows in groups for row in rows) for i in range(3)]
    print("Every config key: set it in a recipe, a --config file, or with --set KEY=VALUE.")
    for title, rows in groups:
        print(f"\n{title}")
        for key, type_name, default, doc in rows:
            print(f"  {key:<{width[0]}}  {type_name:<{width[1]}}  {default:<{width[2]}}  {doc}")


VERBS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "baselines": cmd_baselines,
         "learning-curve": cmd_learning_curve, "explain": cmd_explain, "attack": cmd_attack, "audit": cmd_audit,
         "detect-poison": cmd_detect_poison,
         "report": cmd_report, "predict": cmd_predict, "export": cmd_export, "serve": cmd_serve, "recipes": cmd_recipes,
         "keys": cmd_keys, "info": cmd_info}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnlab", description="Train, evaluate and sample the article's models.")
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train a recipe, or resume a run")
    t.add_argument("recipe", nargs="?", help="a shipped recipe name (see `nnlab recipes`) or a YAML file")
    t.add_argument("--config", help="a YAML file merged over the recipe")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. train.lr=0.1")
    t.add_argument("--out", help="the run folder to create (default runs/RECIPE-TIME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    e = sub.add_parser("eval", help="re-evaluate a saved model on its test split")
    e.add_argument("run_dir")
    g = sub.add_parser("generate", help="sample text from a trained language model")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--context-shift", type=int, help="0 (default): every token sees the full context, as "
                   "nanoGPT's sample.py; S: once it fills, keep its newest block_size - S tokens and decode from "
                   "the cache (faster, shorter contexts; nnlab.generate)")
    b = sub.add_parser("baselines", help="fit traditional ML (scikit-learn) on the deep models' split and compare")
    b.add_argument("--data", help="a data set, as data.name (default fashion-mnist)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data key, e.g. data.path=table.csv or data.limit=1000")
    b.add_argument("--run", metavar="RUN_DIR", help="a trained run: its own split, its model in the table, "
                   "baselines.json written into it")
    b.add_argument("--out", metavar="DIR", help="where baselines.json goes without --run (default runs/baselines-DATA-TIME)")
    b.add_argument("--models", metavar="A,B,...", help="the baselines to fit (default: all that fit the task)")
    b.add_argument("--max-fit-rows", type=int, metavar="N", help="fit every model on at most N training rows "
                   "(default: each model's own limit)")
    c = sub.add_parser("learning-curve", help="test accuracy against training-set size: a recipe beside baselines")
    c.add_argument("recipe", help="a classification recipe (see `nnlab recipes`)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every run")
    c.add_argument("--fractions", metavar="F,F,...", help="fractions of the training set (default 0.01,0.03,0.1,0.3,1)")
    c.add_argument("--seeds", type=int, help="runs per fraction, seeds 0..N-1 (default 3)")
    c.add_argument("--baselines", metavar="A,B,...", help="scikit-learn baselines to fit beside it "
                   "(default random-forest,logistic-regression)")
    c.add_argument("--min-steps", type=int, help="train every deep run for at least this many steps (default 200)")
    c.add_argument("--out", metavar="DIR", help="where the curve goes: a new folder, or the recipe's run folder "
                   "(default runs/RECIPE-learning-curve-TIME)")
    x = sub.add_parser("explain", help="attributions or attention maps for a trained model's predictions")
    x.add_argument("run_dir")
    x.add_argument("--method", help="saliency, integrated-gradients, grad-cam (CNNs), attention or rollout "
                   "(Transformers); default integrated-gradients, or attention for Transformers")
    x.add_argument("--samples", type=int, help="explain the first N test samples (default 8)")
    at = sub.add_parser("attack", help="accuracy under adversarial inputs (FGSM, PGD) against eps, with a "
                        "gradient-masking guard")
    at.add_argument("run_dir")
    at.add_argument("--method", help="fgsm or pgd (default pgd)")
    at.add_argument("--eps", metavar="E,E,...", help="L-infinity radii in pixel units, fractions allowed "
                    "(default 1/255,2/255,4/255,8/255)")
    at.add_argument("--steps", type=int, help="PGD steps (default 10)")
    at.add_argument("--restarts", type=int, help="PGD random starts; an image is broken if any breaks it (default 1)")
    at.add_argument("--samples", type=int, help="attack the first N test images (default 1000)")
    m = sub.add_parser("audit", help="membership inference: can the model's training examples be told from unseen ones?")
    m.add_argument("run_dir", help="a finished classifier run; audit.json and audit.png are written into it")
    m.add_argument("--samples", type=int, help="members and non-members each, at most the split sizes (default 5000; "
                   "2000 when LiRA runs, whose shadows train on that many examples each)")
    m.add_argument("--seed", type=int, help="seed of the drawn examples and of LiRA's shadow halves (default 0)")
    m.add_argument("--attack", help="loss (threshold on the loss), lira (likelihood ratio with shadow models, "
                   "online and offline) or all (default all)")
    m.add_argument("--shadows", type=int, help="LiRA's shadow models, each trained on half of members + "
                   "non-members with the run's recipe (default 8)")
    dp = sub.add_parser("detect-poison", help="flag a backdoored run's poisoned training images from its "
                        "penultimate-layer features; precision and recall against the known ones")
    dp.add_argument("run_dir", help="a finished image classifier run (poisoned or not)")
    dp.add_argument("--method", help="spectral (signatures, Tran et al. 2018; the default) or activation-clustering "
                    "(Chen et al. 2018)")
    dp.add_argument("--expected", type=float, help="spectral: the poisoned share of a class to budget for; each "
                    "class flags 1.5x it (default: the run's own share in its target class)")
    dp.add_argument("--out", metavar="FILE", help="where the JSON goes (default RUN_DIR/detect_poison.json)")
    r = sub.add_parser("report", help="write RUN_DIR/report.html: one self-contained page about a finished run")
    r.add_argument("run_dir", help="a finished run folder; only its report.html is written")
    pr = sub.add_parser("predict", help="classify image files, or continue a prompt, with a trained model")
    pr.add_argument("run_dir")
    pr.add_argument("files", nargs="*", metavar="FILE", help="PNG or JPEG images (any size, grey or colour)")
    pr.add_argument("--top-k", type=int, help="classes shown per image (default 5); for a language model, "
                    "sampling's top-k as in generate")
    pr.add_argument("--invert", action=argparse.BooleanOptionalAction, help="invert the images' brightness "
                    "(default: only images on a light background; the model expects light on dark)")
    pr.add_argument("--json", action="store_true", help="print the result as JSON")
    pr.add_argument("--prompt", help="a language model: the text to continue")
    pr.add_argument("--max-new-tokens", type=int)
    pr.add_argument("--temperature", type=float, help="0 = greedy")
    pr.add_argument("--seed", type=int)
    ex = sub.add_parser("export", help="write the model as ONNX (and int8 ONNX) that onnxruntime runs")
    ex.add_argument("run_dir")
    ex.add_argument("--format", help="onnx (the only format, the default)")
    ex.add_argument("--quantize", help="int8: also write an int8 model beside the fp32 one")
    ex.add_argument("--out", metavar="FILE", help="the .onnx file to write (default RUN_DIR/model.onnx; "
                    "the int8 model goes beside it as NAME.int8.onnx)")
    v = sub.add_parser("serve", help="serve a trained model over HTTP: classify, generate, attention, model card, a page")
    v.add_argument("run_dir")
    v.add_argument("--host", help="the address to bind (default 127.0.0.1; any other needs a token)")
    v.add_argument("--port", type=int, help="the TCP port (default 8000)")
    v.add_argument("--token", help="an API token every request but /healthz must send as "
                   "'Authorization: Bearer TOKEN' (default $NNLAB_SERVE_TOKEN, which other users cannot read in `ps`)")
    v.add_argument("--max-new-tokens", type=int, help="the most tokens one /v1/generate request may ask for "
                   "(default 1000)")
    v.add_argument("--max-batch", type=int, help="classify requests batched into one forward pass, at most "
                   "(default 32; 1 = one at a time)")
    v.add_argument("--backend", help="torch (default) or onnxruntime: run RUN_DIR/model.onnx from `nnlab export` "
                   "(no saliency; generation reruns the context per token, no KV cache)")
    sub.add_parser("recipes", help="list the shipped recipes")
    k = sub.add_parser("keys", help="list every config key with its type, default and doc")
    k.add_argument("--model", help="only this model's keys (default: every model's)")
    sub.add_parser("info", help="what decides speed here: CPU flags, precision=auto, torch, nnlab's kernels, CUDA")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        VERBS[args.verb](args)
    except NnlabError as e:
        print(f"nnlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nnlab: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The process entry point (`nnlab`, `python -m nnlab`, `torchrun -m nnlab`): main(), then exit.

    A torchrun worker (WORLD_SIZE > 1) exits without Python's finalization: torch's C++ objects can
    abort a rank while the interpreter tears them down (benchmarks/README.md), and by then the process
    group is destroyed and every file is written and closed, so skipping it loses nothing. The output
    is flushed first."""
    try:
        code = main()
    except BrokenPipeError:  # `nnlab recipes | head`: the reader left; no traceback, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # a reader that left; nothing more to deliver
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
