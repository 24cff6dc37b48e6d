"""nnlab: the model families behind large AI models (dense, convolutional, self-attention),
trained end to end, measured honestly, and shipped safely.

    import nnlab
    run_dir = nnlab.train("seed-cnn-fast", ["train.epochs=1"])
    model, info = nnlab.load(run_dir)
    print(nnlab.evaluate(run_dir))
"""

__version__ = "0.1.0"

from nnlab.run import evaluate, load  # noqa: E402
from nnlab.train.loop import train  # noqa: E402

__all__ = ["train", "load", "evaluate", "__version__"]
