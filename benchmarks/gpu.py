"""GPU benchmark: lkflow untracked against a hand-written loop, samples per second, bf16.

A ResNet-style CNN on synthetic 32x32 images (the data sit on the GPU, so the input pipeline
does not hide the framework). Each contender runs in its own process, alternating, several
rounds; the ratio of medians is the figure to quote (target: lkflow >= 0.95x the loop).

    python -m benchmarks.gpu --rounds 3 --epochs 3

``--device cpu --rows 512`` runs the same code on the CPU in seconds, to check the harness
(the figures mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from benchmarks.workloads import accuracy

MARKER = "GPU_RESULT "
BATCH, CLASSES = 256, 10


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def resnet(width: int = 64) -> nn.Module:
    """A small ResNet for 32x32 inputs: stem, three stages of two blocks, pooled classifier."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for stage in range(3):
        channels = width * 2**stage
        if stage:
            layers += [nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1), nn.ReLU()]
        layers += [Block(channels), Block(channels)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 4, CLASSES)]
    return nn.Sequential(*layers)


class Batches:
    """Batches made beforehand, as one iterable (Lightning reads a plain list as many loaders)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.batches = list(zip(x.split(BATCH), y.split(BATCH), strict=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loaders(device: str, rows: int) -> tuple[Batches, Batches]:
    """Seeded synthetic images and labels (`rows` to train on, a quarter as many to validate),
    already on `device`, in batches."""
    generator = torch.Generator().manual_seed(0)
    sets = []
    for n in (rows, rows // 4):
        x = torch.randn(n, 3, 32, 32, generator=generator)
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        sets.append(Batches(x.to(device), y.to(device)))
    return sets[0], sets[1]


def torch_loop(epochs: int, device: str, rows: int) -> None:
    """The floor: autocast bf16, metrics summed on the device, read once per epoch."""
    torch.manual_seed(0)
    net, loss_fn = resnet().to(device), nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    train, valid = loaders(device, rows)
    for _ in range(epochs):
        for batches, training in ((train, True), (valid, False)):
            net.train(training)
            total = torch.zeros((), device=device)
            with torch.set_grad_enabled(training):
                for x, y in batches:
                    with torch.autocast(device, dtype=torch.bfloat16):
                        logits = net(x)
                        loss = loss_fn(logits, y)
                    if training:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    total += (loss.detach() + accuracy(logits.detach(), y)) * len(y)
            total.item()  # one read per epoch, as a history row needs
    _synchronize(device)


def lkflow_untracked(epochs: int, device: str, rows: int) -> None:
    """lkflow `fit(gpus=1, precision="bf16-mixed", track=False)` on the same net and data."""
    import lkflow

    torch.manual_seed(0)
    net = resnet()
    model = lkflow.LightModel(
        net,
        loss_fn=nn.CrossEntropyLoss(),
        metrics={"acc": accuracy},
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
    )
    train, valid = loaders(device, rows)
    gpus = 1 if device == "cuda" else 0
    model.fit(
        train, valid, epochs=epochs, gpus=gpus, precision="bf16-mixed", verbose=0, track=False
    )
    _synchronize(device)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CONTENDERS = {"torch_loop": torch_loop, "lkflow_untracked": lkflow_untracked}


def child(name: str, epochs: int, device: str, rows: int) -> None:
    import pytorch_lightning  # noqa: F401  (imports stay out of the clock)

    import lkflow.model  # noqa: F401

    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    CONTENDERS[name](epochs, device, rows)
    seconds = time.perf_counter() - start
    print(MARKER + json.dumps({"seconds": seconds, "samples_per_s": rows * epochs / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rows", type=int, default=20_000, help="training images. Default 20000.")
    parser.add_argument("--child", choices=sorted(CONTENDERS))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.epochs, args.device, args.rows)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here; pass --device cpu --rows 512 to check the harness.")
    results: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for round_ in range(args.rounds):
        order = list(CONTENDERS) if round_ % 2 == 0 else list(reversed(CONTENDERS))
        for name in order:
            command = [sys.executable, "-m", "benchmarks.gpu", "--child", name]
            command += ["--epochs", str(args.epochs), "--device", args.device]
            command += ["--rows", str(args.rows)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            line = next(line for line in out.splitlines() if line.startswith(MARKER))
            results[name].append(json.loads(line.removeprefix(MARKER))["samples_per_s"])
    medians = {name: statistics.median(values) for name, values in results.items()}
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{where}: ResNet-style CNN, 32x32, bf16, batch {BATCH}, {args.rows} images")
    for name, value in medians.items():
        print(f"{name:18s} {value:10.0f} samples/s  (rounds: {results[name]})")
    ratio = medians["lkflow_untracked"] / medians["torch_loop"]
    print(f"lkflow / loop: {ratio:.3f} (target >= 0.95): {'met' if ratio >= 0.95 else 'MISSED'}")


if __name__ == "__main__":
    main()
