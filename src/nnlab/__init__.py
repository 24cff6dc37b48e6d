"""nnlab: the model families behind large AI models (dense, convolutional, self-attention),
trained end to end, measured honestly, and shipped safely.

    import nnlab
    run_dir = nnlab.train("seed-cnn-fast", ["train.epochs=1"])
    model, info = nnlab.load(run_dir)
    print(nnlab.evaluate(run_dir))
"""

__version__ = "0.1.0"

from nnlab.runfolder import load  # noqa: E402
from nnlab.train.loop import train  # noqa: E402


def evaluate(run_dir) -> dict:
    """Re-evaluate a saved model on its test (or validation) split; returns the metrics."""
    import torch

    from nnlab.runfolder import read_config
    from nnlab.tasks import make_task

    cfg = read_config(run_dir)
    model, _ = load(run_dir)
    return make_task(cfg).evaluate(model, torch.device("cpu"))


__all__ = ["train", "load", "evaluate", "__version__"]
