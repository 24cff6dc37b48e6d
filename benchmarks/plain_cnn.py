"""The article's CNN trained the ordinary way: a DataLoader over a TensorDataset, fp32, SGD.

This is the honest baseline that nnlab's `seed-cnn` recipe is compared with (same model, same
batch 64, same SGD lr 0.01, same data and normalisation), written the way the article writes it,
with its two bugs fixed (F imported; 28x28 inputs). It uses torch only, not nnlab's loop.

    python benchmarks/plain_cnn.py --epochs 3 [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common import output_file, positive_int
from nnlab.data import load_images
from nnlab.errors import NnlabError
from nnlab.runfolder import atomic_write_text


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 64 * 7 * 7)
        return self.fc2(F.relu(self.fc1(x)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="plain_cnn.py")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=positive_int, default=None, help="train on the first N images only")
    p.add_argument("--json", type=output_file)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    try:
        d = load_images("fashion-mnist", limit=a.limit)
    except NnlabError as e:  # no dataset installed, say: one line, not a traceback
        p.exit(2, f"plain_cnn.py: error: {e}\n")
    train = TensorDataset(d.normalize(d.x_train), d.y_train)
    test = TensorDataset(d.normalize(d.x_test), d.y_test)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    model = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seconds, seen = 0.0, 0
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            seen += len(inputs)
        seconds += time.perf_counter() - t0
    correct = 0
    with torch.no_grad():
        for inputs, labels in DataLoader(test, batch_size=1000):
            correct += (model(inputs).argmax(1) == labels).sum().item()
    out = {"epochs": a.epochs, "seed": a.seed, "test_accuracy": correct / len(test), "train_seconds": seconds,
           "samples_per_s": seen / seconds}
    print(json.dumps(out))
    if a.json:
        atomic_write_text(a.json, json.dumps(out))
    return out


if __name__ == "__main__":
    main()
