"""Adversarial inputs: how a trained image classifier's accuracy falls when each test image may move
by at most eps per pixel (an L-infinity ball), and a guard that tells a robust model from one whose
gradients merely hide its weakness.

`attack(run_dir, method, eps, steps, restarts, samples)` (`nnlab attack RUN_DIR`) attacks the first
`samples` test images and writes attack/METHOD.json, attack/METHOD.png (accuracy against eps) and
attack/METHOD-examples.png (clean and adversarial images with their predictions). With x in pixel
space [0, 1], y the true class and L the cross-entropy of the model's logits:

  fgsm   x' = clip_[0,1](x + eps * sign(dL/dx))  (Goodfellow et al., 2015): one step.
  pgd    x_0 = x + uniform noise in the ball, then `steps` times
         x_{t+1} = clip_[0,1](proj_eps(x_t + a * sign(dL/dx_t)))  (Madry et al., 2018), a = 2.5 eps / steps
         (so the walk can reach the ball's edge from any start). With `restarts` R > 1 an image counts
         as broken if any of R random starts breaks it.

The attacked function is pixels -> (x - mean) / std -> model (`pixel_model`), with the run's own
normalisation from model.json, so eps is in pixel units (8/255: eight grey levels) whatever the
normalisation. The model is in eval mode during the attack (BatchNorm's running statistics, no
dropout) and its mode is restored afterwards.

Kernels: the gradient steps feed inputs that require a gradient, which conv1_pool2x2 declines (it
computes no input gradient), so a first one-channel conv takes torch's functional path there and
the kernel only in the final predictions, which need no gradient; the later channels-last layers
take pool2x2 and conv3x3_pool2x2 (both with their own backward) in every pass. The paths compute
the same function up to float rounding; tests/test_attack.py holds the accuracies under attack
equal with and without the kernels.

Gradient-masking guard (Carlini et al., 2019, "On evaluating adversarial robustness"), run with every
attack on the first GUARD_SAMPLES images; a failed check is a warning in the output and in the JSON:
  steps      PGD with 2K steps is no weaker than with K (accuracy rises by at most GUARD_TOL).
  restarts   PGD with max(R, 2) restarts is no weaker than with one.
  eps 0.5    PGD at eps 0.5 brings accuracy to chance (1 / classes) or below: every image can be
             moved to the same flat grey, so a model that stays accurate there has masked gradients.
  transfer   PGD run on an independent surrogate (a dense net, SURROGATE_HIDDEN units, trained here
             for SURROGATE_STEPS Adam steps on the run's training images) and replayed on the model
             is no stronger than white-box PGD (accuracy lower by at most GUARD_TOL): a black-box
             attack that beats the white-box one means the white-box gradients mislead.
"""

from __future__ import annotations

import contextlib
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnlab.errors import NnlabError

METHODS = ("fgsm", "pgd")
DEFAULT_EPS = "1/255,2/255,4/255,8/255"
DEFAULT_STEPS = 10
DEFAULT_RESTARTS = 1
DEFAULT_SAMPLES = 1000
STEP_FACTOR = 2.5  # PGD's step a = STEP_FACTOR * eps / steps
BATCH = 500  # images per forward/backward pass
SEED = 0  # PGD's random starts and the surrogate's initialisation and data order
EXAMPLES = 8  # images in the examples figure
GUARD_SAMPLES = 200
GUARD_TOL = 0.01  # PGD is a local search: a per-image result is not monotone in steps
GUARD_EPS = 0.5
SURROGATE_HIDDEN = 256
SURROGATE_STEPS = 300
SURROGATE_BATCH = 128


# ---- the attacked function and the attacks -------------------------------------------------------

class PixelModel(nn.Module):
    """Pixels in [0, 1] -> the run's normalisation -> the model's logits."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def pixel_model(model: nn.Module, info: dict) -> PixelModel:
    """The attacked function of a loaded run (model.json's `info`). A convolutional model is moved to
    channels-last in place, as the fast recipes train: nnlab's pool and conv3x3 kernels take
    channels-last tensors only, and in the gradient passes they are the ones that run."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    norm = info.get("normalize", {"mean": 0.0, "std": 1.0})
    return PixelModel(model, float(norm["mean"]), float(norm["std"]))


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """model.eval() inside the block, each module's own training flag restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def loss_gradient(fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """dL/dx of the summed cross-entropy (a sum, so one image's gradient ignores the batch size)."""
    x = x.detach().requires_grad_()
    loss = F.cross_entropy(fn(x).float(), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def fgsm(fn: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """x' = clip_[0,1](x + eps * sign(dL/dx)) for pixels x (B, C, H, W) in [0, 1]."""
    if eps == 0:
        return x.clone()
    return (x + eps * loss_gradient(fn, x, y).sign()).clamp(0, 1).detach()


def pgd(fn: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = DEFAULT_STEPS, *,
        step_size: float | None = None, restarts: int = DEFAULT_RESTARTS, random_init: bool = True,
        seed: int = SEED) -> Tensor:
    """L-infinity PGD: per restart a uniform random start in the eps ball (none if not random_init),
    then `steps` signed-gradient steps of step_size (default STEP_FACTOR * eps / steps), each projected
    onto the ball and [0, 1]. Returns, per image, the first restart's result that fn misclassifies,
    else the last restart's."""
    if eps == 0:
        return x.clone()
    a = STEP_FACTOR * eps / steps if step_size is None else step_size
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)  # the ball within [0, 1]
    best, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        x_adv = x.clone()
        if random_init:
            noise = (2 * torch.rand(x.shape, generator=gen).to(x.device) - 1) * eps
            x_adv = torch.minimum(torch.maximum(x + noise, lo), hi)
        for _ in range(steps):
            x_adv = x_adv + a * loss_gradient(fn, x_adv, y).sign()
            x_adv = torch.minimum(torch.maximum(x_adv, lo), hi).detach()
        if restarts == 1:  # nothing to choose between
            return x_adv
        with torch.no_grad():
            wrong = fn(x_adv).argmax(1) != y
        keep = ~fooled  # images not yet broken take this restart's result
        best[keep] = x_adv[keep]
        fooled |= wrong
    return best


def perturb(fn: nn.Module, x: Tensor, y: Tensor, method: str, eps: float, steps: int, restarts: int,
            seed: int = SEED) -> Tensor:
    """Adversarial versions of x by `method`, BATCH images at a time (each batch with its own seed)."""
    out = []
    for i in range(0, len(x), BATCH):
        xb, yb = x[i : i + BATCH], y[i : i + BATCH]
        out.append(fgsm(fn, xb, yb, eps) if method == "fgsm" else
                   pgd(fn, xb, yb, eps, steps, restarts=restarts, seed=seed + i))
    return torch.cat(out)


@torch.no_grad()
def predictions(fn: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([fn(x[i : i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])


def accuracy(fn: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predictions(fn, x) == y).float().mean())


# ---- the gradient-masking guard -------------------------------------------------------------------

def train_surrogate(x_train: Tensor, y_train: Tensor, num_classes: int, mean: float, std: float) -> PixelModel:
    """A dense net (one hidden layer of SURROGATE_HIDDEN) trained from seed SEED for SURROGATE_STEPS
    Adam steps on pixel images: a model that shares only the data with the attacked one."""
    from nnlab.models import build_model
    from nnlab.models.mlp import MLPConfig

    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        net = build_model(MLPConfig(in_features=x_train[0].numel(), hidden=(SURROGATE_HIDDEN,),
                                    out_features=num_classes))
        fn = PixelModel(nn.Sequential(nn.Flatten(), net), mean, std)
        opt = torch.optim.Adam(fn.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(SEED)
        for _ in range(SURROGATE_STEPS):
            idx = torch.randint(len(x_train), (SURROGATE_BATCH,), generator=gen)
            loss = F.cross_entropy(fn(x_train[idx].float() / 255), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fn.eval()


def guard(fn: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, num_classes: int,
          surrogate: nn.Module) -> dict:
    """The four checks of the module docstring on pixels x at eps (the attack's largest)."""
    def pgd_acc(f=fn, e=eps, k=steps, r=1):
        return accuracy(fn, perturb(f, x, y, "pgd", e, k, r), y)

    base = pgd_acc()
    more_steps, more_restarts = pgd_acc(k=2 * steps), pgd_acc(r=max(restarts, 2))
    at_half, transfer = pgd_acc(e=GUARD_EPS), pgd_acc(f=surrogate)
    chance = 1 / num_classes
    checks = [
        {"check": "steps", "passed": more_steps <= base + GUARD_TOL,
         "detail": f"PGD-{steps} {base:.3f}, PGD-{2 * steps} {more_steps:.3f} at eps {eps:.4g}"},
        {"check": "restarts", "passed": more_restarts <= base + GUARD_TOL,
         "detail": f"1 restart {base:.3f}, {max(restarts, 2)} restarts {more_restarts:.3f} at eps {eps:.4g}"},
        {"check": "eps 0.5", "passed": at_half <= chance,
         "detail": f"PGD-{steps} at eps {GUARD_EPS}: {at_half:.3f}, chance {chance:.3f}"},
        {"check": "transfer", "passed": transfer >= base - GUARD_TOL,
         "detail": f"transfer from the surrogate {transfer:.3f}, white-box {base:.3f} at eps {eps:.4g}"},
    ]
    return {"samples": len(x), "eps": eps, "steps": steps, "tolerance": GUARD_TOL,
            "passed": all(c["passed"] for c in checks), "checks": checks,
            "surrogate": {"model": f"mlp {SURROGATE_HIDDEN} hidden", "steps": SURROGATE_STEPS,
                          "batch": SURROGATE_BATCH, "optimizer": "adam lr 1e-3", "seed": SEED}}


# ---- inputs ----------------------------------------------------------------------------------------

def parse_eps(text: str) -> list[float]:
    """"1/255,0.1" -> [0.00392..., 0.1]; each value a number or a fraction, in [0, 1]."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise NnlabError(f"--eps: {part!r} is not a number or a fraction like 8/255") from None
        if not 0 <= value <= 1:
            raise NnlabError(f"--eps: {part} is outside [0, 1] (pixel units)")
        values.append(value)
    return values


def test_pixels(run_dir: Path, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(test pixels (n, C, H, W) in [0, 1], labels, training images uint8, training labels) of a run's split."""
    from nnlab.runfolder import read_config
    from nnlab.tasks import make_task

    task = make_task(read_config(run_dir))
    if n > len(task.data.x_test):
        raise NnlabError(f"--samples: {n} is more than the {len(task.data.x_test)} test images")
    x = task.data.x_test[:n].float() / 255
    return x, task.data.y_test[:n], task.data.x_train, task.data.y_train


def _check(run_dir: Path, method: str, eps: list[float], steps: int, restarts: int, samples: int) -> None:
    if not run_dir.is_dir():
        raise NnlabError(f"{run_dir}: no such run folder")
    if method not in METHODS:
        raise NnlabError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("--steps", steps), ("--restarts", restarts), ("--samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NnlabError(f"{name}: must be at least 1, got {value}")
    if any(e < 0 for e in eps):
        raise NnlabError(f"--eps: below 0: {min(eps)}")


# ---- the verb ---------------------------------------------------------------------------------------

def attack(run_dir, method: str = "pgd", eps: str | list[float] = DEFAULT_EPS, steps: int = DEFAULT_STEPS,
           restarts: int = DEFAULT_RESTARTS, samples: int = DEFAULT_SAMPLES) -> dict:
    """Attack a trained image classifier's first `samples` test images at each eps, run the guard,
    write attack/METHOD.json, .png and -examples.png, and return what the JSON holds. Bad input (no
    run folder or model, a model that is not an image classifier, an unknown method, eps < 0 or > 1,
    steps, restarts or samples < 1) is an NnlabError raised before anything is written."""
    from nnlab import kernels, runfolder
    from nnlab.analysis import attack_figures

    run_dir = Path(run_dir)
    eps_list = parse_eps(eps) if isinstance(eps, str) else [float(e) for e in eps]
    _check(run_dir, method, eps_list, steps, restarts, samples)
    model, info = runfolder.load(run_dir)
    if info.get("task") != "image" or not info.get("classes"):
        raise NnlabError(f"attack: takes image classifiers; {run_dir} holds a {info.get('task')} model "
                         f"({info['model']['name']})")
    out_dir = run_dir / runfolder.ATTACK_DIR
    blocker = runfolder.file_in_the_way(out_dir)
    if blocker is not None:
        raise NnlabError(f"{out_dir}: {blocker} is a file, not a folder")
    x, y, x_train, y_train = test_pixels(run_dir, samples)
    fn = pixel_model(model, info)
    classes = info["classes"]

    start = time.perf_counter()
    with evaluating(model):
        clean = accuracy(fn, x, y)
        rows, shown = [], None
        for e in eps_list:
            t0 = time.perf_counter()
            x_adv = perturb(fn, x, y, method, e, steps, restarts)
            rows.append({"eps": e, "accuracy": accuracy(fn, x_adv, y), "seconds": round(time.perf_counter() - t0, 3),
                         "max_change": float((x_adv - x).abs().max())})
            if e == max(eps_list):
                shown = x_adv[:EXAMPLES]
        g = min(samples, GUARD_SAMPLES)
        norm = info.get("normalize", {"mean": 0.0, "std": 1.0})
        surrogate = train_surrogate(x_train, y_train, len(classes), float(norm["mean"]), float(norm["std"]))
        result_guard = guard(fn, x[:g], y[:g], max(eps_list), steps, restarts, len(classes), surrogate)
        pred_clean, pred_adv = predictions(fn, x[:EXAMPLES]), predictions(fn, shown)
    result = {"method": method, "model": info["model"]["name"], "samples": samples, "clean_accuracy": clean,
              "eps": [r["eps"] for r in rows], "accuracy": [r["accuracy"] for r in rows], "rows": rows,
              "steps": steps if method == "pgd" else 1, "restarts": restarts if method == "pgd" else 1,
              "step_size": f"{STEP_FACTOR} * eps / steps" if method == "pgd" else "eps",
              "random_init": method == "pgd", "seed": SEED, "normalize": info.get("normalize"),
              "chance": 1 / len(classes), "guard": result_guard,
              "examples": {"eps": max(eps_list), "true": [classes[i] for i in y[:EXAMPLES].tolist()],
                           "clean": [classes[i] for i in pred_clean.tolist()],
                           "adversarial": [classes[i] for i in pred_adv.tolist()]},
              "kernels_used": kernels.used()}
    files = attack_figures.draw(method, result, x[:EXAMPLES].numpy(), shown.numpy())
    result["wall_s"] = round(time.perf_counter() - start, 3)

    out_dir.mkdir(exist_ok=True)
    for name, content in files.items():
        runfolder.atomic_write_bytes(run_dir / name, content)
    result["files"] = sorted(files)
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runfolder.write_json(out_dir / f"{method}.json", result)  # last: its presence means the files are whole
    return result


def format_result(result: dict) -> str:
    """What `nnlab attack` prints: accuracy per eps, the guard's verdict (a WARNING per failed check)."""
    label = "FGSM" if result["method"] == "fgsm" else f"PGD-{result['steps']} x {result['restarts']} restart(s)"
    lines = [(f"{result['model']}: {label} on {result['samples']} test images ({result['wall_s']:.1f} s); "
              f"clean accuracy {result['clean_accuracy']:.4f}"),
             f"  {'eps':>8s}  {'accuracy':>8s}  {'seconds':>7s}"]
    for r in result["rows"]:
        lines.append(f"  {_eps_label(r['eps']):>8s}  {r['accuracy']:8.4f}  {r['seconds']:7.2f}")
    g = result["guard"]
    lines.append(f"gradient-masking guard on {g['samples']} images: " + ("passed" if g["passed"] else "FAILED"))
    for c in g["checks"]:
        lines.append(f"  {'ok' if c['passed'] else 'WARNING'} {c['check']}: {c['detail']}")
    lines.append("wrote " + ", ".join([*result["files"], f"attack/{result['method']}.json"]))
    return "\n".join(lines)


def _eps_label(eps: float) -> str:
    """8/255 for a multiple of 1/255, else the number."""
    n = eps * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-6 and eps else f"{eps:.4g}"
