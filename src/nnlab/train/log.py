"""Where training reports go: metrics.jsonl, TensorBoard (both in the run folder), and the console.

All local: nothing is sent over the network. On a terminal the console shows a live progress bar
(loss, lr, throughput, ETA); when output is piped or redirected it prints plain log lines instead,
so CI logs and `nohup` files stay readable.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nnlab.runfolder import METRICS, TENSORBOARD


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLogger:
    def __init__(self, run_dir: Path | None, total_steps: int, unit: str, start_step: int = 0,
                 tensorboard: bool = True, quiet: bool = False):
        self.run_dir, self.total, self.unit = run_dir, total_steps, unit
        self.quiet = quiet or run_dir is None  # non-zero ranks pass run_dir=None and stay silent
        self.tb = None
        self.jsonl = None
        if run_dir is not None:
            self.jsonl = open(run_dir / METRICS, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD))
        self.progress = None
        if not self.quiet and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def record(self, event: str, step: int, **values) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"event": event, "step": step, "time": round(time.time(), 3), **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def train_line(self, step: int, loss: float, lr: float, rate: float, eta: float) -> None:
        info = f"loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} {self.unit}/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif not self.quiet:
            print(f"step {step}/{self.total} | {info} | eta {fmt_seconds(eta)}", flush=True)

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
