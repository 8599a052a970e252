"""PyTorch (CPU) twin of a config's backprop training step, for `benchmark.py`'s side-by-side
baseline: the same network (the MLP or the cnn_pool conv net: widths, activation, biases), the
same batch size and the same step (forward, softmax cross-entropy, backward, clipping to the
config's global norm, SGD with its momentum and weight decay), on a fixed batch resident in memory.
Our step also draws and augments its batch on the device; this one does not, which favours torch.

PyTorch is not a dependency of the project: `available()` says whether it can be imported, and
the benchmark skips the baseline (with a message) where it cannot.
"""

from __future__ import annotations

import importlib.util
import time

NETWORKS = ('mlp', 'cnn')  # the models with a twin here


def available() -> bool:
  return importlib.util.find_spec('torch') is not None


def supports(config) -> bool:
  return config.model in NETWORKS


def _activation(name: str):
  import torch.nn as tnn

  return {
    'elu': tnn.ELU,
    'relu': tnn.ReLU,
    'sigmoid': tnn.Sigmoid,
    'tanh': tnn.Tanh,
    'leaky_relu': lambda: tnn.LeakyReLU(0.01),
    'none': tnn.Identity,
  }[name]()


def network(config, image_shape: tuple[int, ...], num_classes: int):
  """The torch module of `config.model` ('mlp' or 'cnn'), NCHW input."""
  import torch.nn as tnn

  h, w, c = image_shape if len(image_shape) == 3 else (*image_shape, 1)
  if config.model == 'mlp':
    s = config.mlp
    layers, width = [tnn.Flatten()], h * w * c
    for hidden in s.hidden:
      layers += [tnn.Linear(width, int(hidden), bias=s.use_bias), _activation(s.activation)]
      width = int(hidden)
    layers += [tnn.Linear(width, num_classes, bias=s.use_bias), _activation(s.output_activation)]
    return tnn.Sequential(*layers)
  s = config.cnn
  layers, width = [], c
  for channels in s.channels:
    layers += [
      tnn.Conv2d(width, int(channels), 3, padding=1, bias=s.use_bias),
      _activation(s.activation),
      tnn.MaxPool2d(2, ceil_mode=True),  # 'SAME' 2×2 pools: ceil division, as the JAX net
    ]
    width = int(channels)
    h, w = -(-h // 2), -(-w // 2)
  layers += [
    tnn.Flatten(),
    tnn.Linear(width * h * w, num_classes, bias=s.use_bias),
    _activation(s.output_activation),
  ]
  return tnn.Sequential(*layers)


class Step:
  """`steps` backprop training steps of the twin network per call, timed per thread count."""

  def __init__(self, config, image_shape, num_classes: int, batch: int, steps: int, threads):
    import torch

    torch.manual_seed(0)
    self.torch, self.steps, self.threads = torch, steps, tuple(threads)
    self.net = network(config, image_shape, num_classes)
    opt = config.optimizer.forward
    self.clip = float(opt.clip)
    self.opt = torch.optim.SGD(
      self.net.parameters(),
      lr=float(opt.lr),
      momentum=float(opt.get('momentum', 0.0)),
      weight_decay=float(opt.get('weight_decay', 0.0)),
    )
    h, w, c = image_shape if len(image_shape) == 3 else (*image_shape, 1)
    self.x = torch.randn(batch, c, h, w)
    self.y = torch.randint(0, num_classes, (batch,))
    self.loss = torch.nn.CrossEntropyLoss()
    self.times: dict[int, list[float]] = {t: [] for t in self.threads}
    for t in self.threads:  # warm-up
      self.call(t)

  def call(self, threads: int) -> float:
    torch = self.torch
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for _ in range(self.steps):
      self.opt.zero_grad(set_to_none=True)
      self.loss(self.net(self.x), self.y).backward()
      if self.clip > 0:
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
      self.opt.step()
    return time.perf_counter() - t0

  def time_call(self) -> None:
    for t in self.threads:
      self.times[t].append(self.call(t))


def matmul(n: int = 2048):
  """torch's fp32 n×n matmul at `threads`: a callable returning seconds, and its FLOPs."""
  import torch

  a = torch.randn(n, n)
  a @ a

  def call(threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    a @ a
    return time.perf_counter() - t0

  return call, 2 * n**3
