"""Audit a PyTorch Lightning + Opacus run on real MNIST digits with ``DMAuditCallback``.

    pip install lightning
    python examples/lightning_mnist.py --root runs/lightning --noise-multiplier 0.01

The LightningModule makes its optimizer private in ``configure_optimizers`` and keeps the
``PrivacyEngine`` as ``self.privacy_engine``; the callback does the rest. Audit artifacts go to
``<root>/lightning_logs/version_N/dmaudit`` and the audit's TensorBoard scalars and images into the
run's own TensorBoard log. Resume with ``--resume CKPT --version N``: the audit (and ε) continue
where the checkpoint left them, in the same log.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.assets.data import mnist_5k_split
from opacus_dmaudit.demo import digit_cnn
from opacus_dmaudit.integrations.lightning import DMAuditCallback


class DigitClassifier(pl.LightningModule):
    """An ImprintBlock in front of a small CNN, trained with DP-SGD (Poisson sampling)."""

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float = 1.0, lr: float = 0.5):
        super().__init__()
        split = mnist_5k_split()
        self.train_data = torch.utils.data.TensorDataset(*split["private"])
        block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(split["prior"][0])
        self.net = nn.Sequential(block, digit_cnn())
        self.noise_multiplier, self.max_grad_norm, self.lr = noise_multiplier, max_grad_norm, lr
        self.privacy_engine = PrivacyEngine(accountant="rdp")
        self._loader = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        loader = torch.utils.data.DataLoader(self.train_data, batch_size=64)
        # the GradSampleModule hooks into self.net's layers; keep self.net itself, so that
        # checkpoints hold the plain parameter names and load before this method runs again
        dp_net, optimizer, self._loader = self.privacy_engine.make_private(
            module=self.net,
            optimizer=torch.optim.SGD(self.net.parameters(), lr=self.lr),
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
        )
        self._dp_modules = [dp_net]  # a plain list: not a registered submodule
        return optimizer

    def train_dataloader(self):
        return self._loader  # Opacus's Poisson-sampling loader


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/lightning_mnist")
    parser.add_argument("--noise-multiplier", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="audit every N steps")
    parser.add_argument("--prior", default="embedded:mnist", help="'none' for no DM step")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps")
    parser.add_argument("--resume", default=None, metavar="CKPT")
    parser.add_argument(
        "--version", type=int, default=None, help="TensorBoardLogger version (resume into it)"
    )
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = DigitClassifier(noise_multiplier=args.noise_multiplier)
    audit = DMAuditCallback(
        every_n_steps=args.every, prior=None if args.prior == "none" else args.prior
    )
    callbacks: list = [audit]
    if args.checkpoint_every:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(every_n_train_steps=args.checkpoint_every, save_top_k=-1)
        )
    trainer = pl.Trainer(
        default_root_dir=args.root,
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(args.root, version=args.version),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=args.resume)
    print(f"audit: {trainer.log_dir}/dmaudit   tensorboard --logdir {args.root}")
    return trainer, audit


if __name__ == "__main__":
    main()
