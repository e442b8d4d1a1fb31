"""Audit a Hugging Face ``Trainer`` + Opacus run on real MNIST digits.

    pip install transformers accelerate
    python examples/huggingface_mnist.py --output-dir runs/hf --noise-multiplier 0.01

The model, optimizer and Poisson-sampling loader come from ``PrivacyEngine.make_private`` and are
handed to the ``Trainer``; ``DMAuditTrainerCallback`` audits. Audit artifacts go to
``<output-dir>/dmaudit``, the audit's TensorBoard scalars and
images into the Trainer's own TensorBoard log. ``--resume`` continues from the last checkpoint,
audit included.
"""

from __future__ import annotations

import argparse

import torch
from opacus import PrivacyEngine
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.assets.data import mnist_5k_split
from opacus_dmaudit.demo import digit_cnn
from opacus_dmaudit.integrations.huggingface import DMAuditTrainerCallback


class DigitModel(nn.Module):
    """Takes ``pixel_values`` and ``labels`` and returns ``(loss, logits)``, as Trainer expects."""

    def __init__(self, block: ImprintBlock):
        super().__init__()
        self.block, self.cnn = block, digit_cnn()

    def forward(self, pixel_values, labels=None):
        logits = self.cnn(self.block(pixel_values))
        if labels is None:
            return (logits,)
        return nn.functional.cross_entropy(logits, labels), logits


def as_dict(batch):
    x, y = zip(*batch)
    return {"pixel_values": torch.stack(x), "labels": torch.stack(y)}


class DPTrainer(Trainer):
    """Trains on Opacus's Poisson-sampling loader instead of building its own."""

    def __init__(self, *args, dp_loader, **kwargs):
        super().__init__(*args, **kwargs)
        self.dp_loader = dp_loader
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean, as Opacus assumes

    def get_train_dataloader(self):
        return self.dp_loader


class ClearDPOptimizer(TrainerCallback):
    """Trainer clears gradients with ``model.zero_grad()``; DP-SGD also needs the optimizer's."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def on_step_begin(self, args, state, control, **kwargs):
        self.optimizer.zero_grad(set_to_none=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/hf_mnist")
    parser.add_argument("--noise-multiplier", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="audit every N steps")
    parser.add_argument("--prior", default="embedded:mnist", help="'none' for no DM step")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="from the last checkpoint")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    split = mnist_5k_split()
    data = torch.utils.data.TensorDataset(*split["private"])
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(split["prior"][0])
    model = DigitModel(block)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=torch.utils.data.DataLoader(data, batch_size=64, collate_fn=as_dict),
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=1.0,
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # Opacus clips per sample; no global clipping on top
        logging_steps=args.every,
        save_steps=args.save_steps or args.max_steps,
        save_strategy="steps" if args.save_steps else "no",
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPTrainer(
        model=model, args=training_args, optimizers=(optimizer, None), dp_loader=loader
    )
    trainer.add_callback(ClearDPOptimizer(optimizer))
    audit = DMAuditTrainerCallback(
        privacy_engine=engine,
        trainer=trainer,
        every_n_steps=args.every,
        prior=None if args.prior == "none" else args.prior,
    )
    trainer.add_callback(audit)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"audit: {args.output_dir}/dmaudit   tensorboard --logdir {args.output_dir}")
    return trainer, audit


if __name__ == "__main__":
    main()
