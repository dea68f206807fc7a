"""LightningModules written as Lightning's and torchmetrics' documentation write them, not for
lkflow: the tests track them with `MLflowCallback` unchanged.

- `LitAutoEncoder`: the autoencoder of Lightning's quick start ("Lightning in 15 minutes"): no
  `forward`, `self.log("train_loss", loss)` in `training_step` (per step only, Lightning's
  default there) and `self.log("val_loss", ...)` in `validation_step` (per epoch, the default
  there); on the 8x8 digits here instead of MNIST's 28x28.
- `LitClassifier`: torchmetrics' "TorchMetrics in PyTorch Lightning" pattern: metric objects
  updated in the steps, a step value `train_acc_step` and the epoch's `train_acc_epoch` logged
  in `on_train_epoch_end`, `valid_acc` logged on step and epoch, `save_hyperparameters()`, a
  `model` submodule, and Adam with a StepLR from `configure_optimizers`.
- `LitTabular`: a module with `example_input_array` (Lightning's API: a tuple is passed by
  position), two inputs `forward(x_num, x_cat)`, and no `net` or `model` submodule.
- `DigitsData`: a LightningDataModule of the digits, for LightningCLI.

`flattened(batch)` is the autoencoder's encoder input, for `MLflowCallback(example_input=...)`.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn, optim
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split

from lkflow.datasets import digits, tabular

# ---- Lightning's quick start ---------------------------------------------------------------


class LitAutoEncoder(pl.LightningModule):
    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def training_step(self, batch, batch_idx):
        # training_step defines the train loop.
        x, _ = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = nn.functional.mse_loss(x_hat, x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        val_loss = nn.functional.mse_loss(x_hat, x)
        self.log("val_loss", val_loss)

    def configure_optimizers(self):
        optimizer = optim.Adam(self.parameters(), lr=1e-3)
        return optimizer


def flattened(batch):
    """The encoder's input in a batch, as `training_step` makes it."""
    x, _ = batch
    return x.view(x.size(0), -1)


def autoencoder() -> LitAutoEncoder:
    encoder = nn.Sequential(nn.Linear(8 * 8, 64), nn.ReLU(), nn.Linear(64, 3))
    decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 8 * 8))
    return LitAutoEncoder(encoder, decoder)


# ---- torchmetrics in Lightning -------------------------------------------------------------


class LitClassifier(pl.LightningModule):
    def __init__(self, num_classes: int = 10, hidden: int = 32, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        self.train_acc = torchmetrics.classification.Accuracy(
            task="multiclass", num_classes=num_classes
        )
        self.valid_acc = torchmetrics.classification.Accuracy(
            task="multiclass", num_classes=num_classes
        )

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        preds = self(x)
        loss = F.cross_entropy(preds, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        # log step metric
        self.train_acc(preds, y)
        self.log("train_acc_step", self.train_acc)
        return loss

    def on_train_epoch_end(self):
        # log epoch metric
        self.log("train_acc_epoch", self.train_acc)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.valid_acc.update(logits, y)
        self.log("valid_acc", self.valid_acc, on_step=True, on_epoch=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64, rows: int = 640):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str):
        data = torch.utils.data.Subset(digits(), range(self.hparams.rows))
        generator = torch.Generator().manual_seed(0)
        self.train, self.valid = random_split(data, [0.75, 0.25], generator=generator)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.valid, batch_size=self.hparams.batch_size)


# ---- example_input_array, two inputs --------------------------------------------------------


class LitTabular(pl.LightningModule):
    def __init__(self, hidden: int = 16, embedding: int = 3, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(8, embedding)
        self.mlp = nn.Sequential(nn.Linear(4 + embedding, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # forward(*example_input_array): numeric features and a category, 8 rows
        self.example_input_array = (torch.randn(8, 4), torch.arange(8))

    def forward(self, x_num, x_cat):
        return self.mlp(torch.cat([x_num, self.embed(x_cat)], dim=1))

    def training_step(self, batch, batch_idx):
        x_num, x_cat, y = batch
        loss = F.binary_cross_entropy_with_logits(self(x_num, x_cat), y)
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x_num, x_cat, y = batch
        logits = self(x_num, x_cat)
        self.log("val_loss", F.binary_cross_entropy_with_logits(logits, y))
        self.log("val_acc", ((logits > 0).float() == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def tabular_loaders() -> tuple[DataLoader, DataLoader]:
    """Train (512 rows) and validation (200 rows) loaders of lkflow's tabular task."""
    train = DataLoader(tabular(512, seed=1), batch_size=64, shuffle=True)
    return train, DataLoader(tabular(200, seed=2), batch_size=64)
