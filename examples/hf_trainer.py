"""Hugging Face `Trainer` with fused_optim: both ways Trainer takes a custom optimizer.

1. ``optimizers=(optimizer, scheduler)``: you build both (any torch LR scheduler works, ours read the
   group's ``lr`` every step);
2. ``optimizer_cls_and_kwargs=(Adan, {...})``: Trainer builds the optimizer over the params it chooses
   (weight-decay groups included) and its own scheduler from ``TrainingArguments``. It does not pass
   ``learning_rate`` to the class: put ``"lr"`` in the kwargs.

The model is a tiny GPT-2 built from a config (no download); the data is random token sequences.
Run: ``python examples/hf_trainer.py``.
"""
from __future__ import annotations

import tempfile

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
)

from fused_optim import Adan, Lion


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern (each sequence repeats a short motif) so the loss visibly falls
        motifs = torch.randint(0, vocab, (n, 4), generator=g)
        self.data = motifs.repeat(1, length // 4)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg)


def _args(out_dir: str, max_steps: int, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=8,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, seed=0, **kw)


def train_with_optimizer_and_scheduler(out_dir: str, max_steps: int = 20):
    model = tiny_gpt2()
    opt = Lion(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=max_steps)
    trainer = Trainer(model=model, args=_args(out_dir, max_steps), train_dataset=RandomTokens(),
                      optimizers=(opt, sched))
    trainer.train()
    return trainer


def train_with_optimizer_cls(out_dir: str, max_steps: int = 20, lr: float = 3e-3):
    model = tiny_gpt2()
    args = _args(out_dir, max_steps, learning_rate=lr, weight_decay=0.02, lr_scheduler_type="linear")
    # Trainer passes the weight-decay groups but not `learning_rate` to the class: without "lr" here the
    # optimizer would train at its default lr while the logs show args.learning_rate
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                      optimizer_cls_and_kwargs=(Adan, {"lr": args.learning_rate, "betas": (0.98, 0.92, 0.99),
                                                       "max_grad_norm": 1.0}))
    trainer.train()
    return trainer


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for fn in (train_with_optimizer_and_scheduler, train_with_optimizer_cls):
            t = fn(d)
            ls = losses(t)
            opt = getattr(t.optimizer, "optimizer", t.optimizer)  # Trainer may wrap it (accelerate)
            print(f"{fn.__name__}: {type(opt).__name__} loss {ls[0]:.3f} -> {ls[-1]:.3f}")
