"""Lightning: fused_optim optimizers from ``configure_optimizers``, stepped with Lightning's closure.

With automatic optimization Lightning calls ``optimizer.step(closure=...)``, where the closure runs
``training_step``, ``zero_grad`` and ``backward``. Our optimizers run the closure under
``torch.enable_grad()`` and return its loss, as torch's do; closure-driven optimizers (``SAM``, which
evaluates the closure twice) work the same way. Schedulers go in the usual ``lr_scheduler`` dict.

Run: ``python examples/lightning_module.py``.
"""
from __future__ import annotations

import lightning as L
import torch

from fused_optim import Lion


class TinyRegressor(L.LightningModule):
    def __init__(self, make_optimizer=None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        self.make_optimizer = make_optimizer or (lambda params: Lion(params, lr=2e-2, weight_decay=0.01))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def regression_data(n: int = 256, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)


def fit(module: TinyRegressor, max_steps: int = 40) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, regression_data())
    return trainer


if __name__ == "__main__":
    module = TinyRegressor()
    fit(module)
    first, last = module.losses[:8], module.losses[-8:]  # one epoch each (8 batches)
    print(f"Lion in Lightning: mean epoch loss {sum(first) / 8:.3f} -> {sum(last) / 8:.3f}")
