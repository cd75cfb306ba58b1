"""Deep belief network: a stack of RBMs, pretrained greedily with CD-k, then fine-tuned by
backprop as a sigmoid network with a linear head (Hinton, Osindero & Teh 2006).

RBM with visible v (n_v), hidden h in {0,1}^(n_h), weights W (n_h x n_v), biases b, c:

* Bernoulli-Bernoulli: E(v, h) = -b.v - c.h - h.W v, for v in [0, 1] (probabilities allowed).
* Gaussian-Bernoulli (unit variance; standardise the inputs):
  E(v, h) = |v - b|^2 / 2 - c.h - h.W v.

In both, p(h_j = 1 | v) = sigmoid(c_j + W_j.v); E[v | h] = sigmoid(b + W^T h) (Bernoulli)
or b + W^T h (Gaussian). CD-k: starting from data v0, alternate k times h ~ p(h | v),
v = E[v | h] (mean-field visible reconstructions, as in Hinton's practical guide), and take
the step  W += lr * (p(h|v0)^T v0 - p(h|vk)^T vk) / batch,  b += lr * mean(v0 - vk),
c += lr * mean(p(h|v0) - p(h|vk)). The reconstruction error reported per epoch is the mean
over samples of |v0 - E[v | p(h|v0)]|^2 / n_v (one deterministic up-down pass).

The network's forward is x -> flatten -> sigmoid(W_1 x + c_1) -> ... -> linear head, so
the pretrained stack initialises a sigmoid MLP. Hidden layers: ``rbms.<i>.act`` (each
RBM's sigmoid module: its hidden-unit probabilities).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsm_train._validation import check_choice, check_positive, to_tensor
from lsm_train.models.mlp import widths_from
from lsm_train.models.registry import flatten_inputs, positive_int, register_model

__all__ = ["RBM", "DBN", "dbn"]

VISIBLE = ("bernoulli", "gaussian")


class RBM(nn.Module):
    """One RBM; ``forward(v)`` returns p(h = 1 | v) through the ``act`` sigmoid module."""

    def __init__(self, n_visible: int, n_hidden: int, visible: str = "bernoulli"):
        super().__init__()
        self.visible = check_choice(visible, "visible", VISIBLE)
        self.weight = nn.Parameter(torch.randn(n_hidden, n_visible) * 0.01)
        # the visible bias is only used by CD (never by forward), so it is a buffer: no
        # unused parameter for DDP or the fine-tuning optimizer; it is saved with the model
        self.register_buffer("visible_bias", torch.zeros(n_visible))
        self.hidden_bias = nn.Parameter(torch.zeros(n_hidden))
        self.act = nn.Sigmoid()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(v, self.weight, self.hidden_bias))

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[v | h]."""
        mean = h @ self.weight + self.visible_bias
        return torch.sigmoid(mean) if self.visible == "bernoulli" else mean

    @torch.no_grad()
    def reconstruction_error(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared error of one mean-field up-down pass."""
        return (v - self.visible_mean(self(v))).pow(2).mean(dim=1)

    @torch.no_grad()
    def cd_step(
        self, v0: torch.Tensor, k: int, lr: float, generator: torch.Generator | None = None
    ) -> float:
        """One CD-k update on the batch ``v0``; returns its reconstruction error before the step."""
        ph0 = self(v0)
        err = float((v0 - self.visible_mean(ph0)).pow(2).mean())
        phk, vk = ph0, v0
        for _ in range(k):
            hk = torch.bernoulli(phk, generator=generator)
            vk = self.visible_mean(hk)
            phk = self(vk)
        n = v0.shape[0]
        self.weight.add_((ph0.T @ v0 - phk.T @ vk) / n, alpha=lr)
        self.visible_bias.add_((v0 - vk).mean(0), alpha=lr)
        self.hidden_bias.add_((ph0 - phk).mean(0), alpha=lr)
        return err


class DBN(nn.Module):
    def __init__(self, in_features: int, num_classes: int, sizes: list[int], visible: str):
        super().__init__()
        self.in_features = in_features
        dims = [in_features, *sizes]
        self.rbms = nn.ModuleList(
            RBM(dims[i], dims[i + 1], visible if i == 0 else "bernoulli")
            for i in range(len(sizes))
        )
        self.head = nn.Linear(dims[-1], num_classes)
        self.hidden_layers = [f"rbms.{i}.act" for i in range(len(sizes))]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_inputs(x, self.in_features, "DBN")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flat(x)
        for rbm in self.rbms:
            x = rbm(x)
        return self.head(x)

    # ------------------------------------------------------------------ pretraining
    def _batches(
        self, data: Any, batch_size: int, generator: torch.Generator | None
    ) -> Iterator[torch.Tensor]:
        """Flattened float batches on the model's device from a tensor/array or a DataLoader."""
        device = self.head.weight.device
        dtype = self.head.weight.dtype
        if isinstance(data, torch.utils.data.DataLoader):
            for item in data:
                x = item[0] if isinstance(item, list | tuple) else item
                yield self._checked(to_tensor(x, "data batch").to(device, dtype))
            return
        x = self._checked(to_tensor(data, "data").to(device, dtype))
        perm = torch.randperm(x.shape[0], generator=generator).to(device)
        for i in range(0, x.shape[0], batch_size):
            yield x[perm[i:i + batch_size]]

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"data: expected a batch of samples (N, ...), got shape "
                             f"{tuple(x.shape)}")
        x = self._flat(x)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("data: expected finite values, found NaN or inf")
        if self.rbms[0].visible == "bernoulli" and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"data: Bernoulli visible units need values in [0, 1], got range "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; scale the inputs or build "
                f"the DBN with visible='gaussian' (and standardised inputs)"
            )
        return x

    def _upto(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        with torch.no_grad():
            for rbm in self.rbms[:layer]:
                x = rbm(x)
        return x

    def pretrain(
        self, data: Any, epochs: int = 5, k: int = 1, lr: float = 0.1,
        batch_size: int = 16, seed: int | None = None,
    ) -> list[list[float]]:
        """Greedy layer-wise CD-k pretraining of every RBM, bottom to top.

        ``data``: inputs of any shape (flattened per sample) as a tensor/array, or a
        DataLoader yielding ``x`` or ``(x, y, ...)`` (its own batching is used). Layer i is
        trained on the hidden probabilities of layers < i. Returns, per layer, the mean
        reconstruction error of each epoch (``epochs`` numbers per layer), measured on each
        batch before its update. Gaussian visible units want a smaller ``lr`` (about 0.01).
        ``seed`` fixes the shuffling and the Gibbs sampling (CPU generator; on other devices
        the global RNG is used).
        """
        epochs, k = positive_int(epochs, "epochs"), positive_int(k, "k")
        batch_size = positive_int(batch_size, "batch_size")
        lr = check_positive(lr, "lr")
        device = self.head.weight.device
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
        sample_gen = gen if device.type == "cpu" else None
        history: list[list[float]] = []
        for i, rbm in enumerate(self.rbms):
            errors = []
            for _ in range(epochs):
                total, count = 0.0, 0
                for v in self._batches(data, batch_size, gen):
                    v = self._upto(v, i)
                    total += rbm.cd_step(v, k, lr, sample_gen) * v.shape[0]
                    count += v.shape[0]
                errors.append(total / count)
            history.append(errors)
        return history

    @torch.no_grad()
    def reconstruction_errors(self, data: Any) -> list[float]:
        """Mean reconstruction error of every RBM on ``data`` (its input from the layers below)."""
        x = self._checked(to_tensor(data, "data").to(self.head.weight.device,
                                                      self.head.weight.dtype))
        out = []
        for rbm in self.rbms:
            out.append(float(rbm.reconstruction_error(x).mean()))
            x = rbm(x)
        return out


@register_model
def dbn(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    sizes: list[int] | int = (128, 64), depth: int | None = None, visible: str = "bernoulli",
) -> DBN:
    """DBN with RBM hidden sizes ``sizes`` (an int repeats ``depth`` times, default 2);
    ``visible='gaussian'`` makes the first RBM Gaussian-Bernoulli. GPU scale:
    ``sizes=[2048, 1024, 512]``."""
    h, w = image_size
    return DBN(in_channels * h * w, num_classes, widths_from(sizes, depth, "sizes"),
               check_choice(visible, "visible", VISIBLE))
