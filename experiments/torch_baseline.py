"""PyTorch (CPU) twins of a config's training step, for `benchmark.py`'s side-by-side baseline, on
a fixed batch resident in memory (our step also draws and augments its batch on the device; these
do not, which favours torch). `kind(config)` says which twin a config gets:

- 'bp' (`Step`, every rule but CCL): the same network (the MLP or the cnn_pool conv net: widths,
  activation, biases), batch size and backprop step (forward, softmax cross-entropy, backward,
  clipping to the config's global norm, SGD with its momentum and weight decay).
- 'ccl' (`CclStep`, rule 'ccl' on 'mlp' or 'cnn'): our CCL step (`rules/counter_current.py`)
  written again in torch: the forward net with every layer's input detached, the feedback net
  (`FeedbackMLP` / `FeedbackCNN`) on the K×K identity with every layer's input detached, the same
  pair losses (MLP: the prototype loss (256·c/d)·mean((h gᵀ − Y)²), pair 0 the input against g_0;
  CNN: the normalised pair loss with its ĤĤᵀ and ĜĜᵀ terms, weights `ccl.loss_scale` and
  `ccl.self_scale`), the task loss `config.loss` on the output activation, one backward of the
  summed loss, then per tree (forward, feedback) what `optim.make` does: gradient centralisation
  if set, clipping to the tree's global norm, weight decay, SGD with momentum and the tree's lr
  schedule. The conv nets' `ccl.loss_warmup_steps` (on in cifar10_ccl: 100 steps) scales the
  loss, hence every gradient, by min(1, (step+1)/N), as `base.loss_warmup` does. Not reproduced:
  `ccl.filter_target` (off, 0, in every CCL config) and Adam; a config using either gets no
  twin. Our MLP step keeps the feedback kernels' gradients as rank-K factors (`optim.LowRank`)
  under plain SGD; torch's autograd writes them out dense (the same values).

`CclStep.load_jax` copies our JAX parameters into the twin (NHWC → NCHW layouts), so its
`losses()` can be checked against `rule.losses` (tests/test_benchmark.py).

PyTorch is not a dependency of the project: `available()` says whether it can be imported, and
the benchmark skips the baseline (with a message) where it cannot.
"""

from __future__ import annotations

import importlib.util
import math
import time

NETWORKS = ('mlp', 'cnn')  # the models with a twin here


def available() -> bool:
  return importlib.util.find_spec('torch') is not None


def kind(config) -> str | None:
  """Which torch step is the twin of `config`'s: 'ccl', 'bp', or None (no twin)."""
  if config.model not in NETWORKS:
    return None
  if config.rule != 'ccl':
    return 'bp'
  plain = config.ccl.filter_target == 0 and all(
    config.optimizer[t].name == 'sgd' for t in ('forward', 'feedback')
  )
  return 'ccl' if plain else None


def supports(config) -> bool:
  return kind(config) is not None


def make(config, image_shape, num_classes: int, batch: int, steps: int, threads, total_steps=1):
  """The twin step of `kind(config)` (`total_steps`: the run's length, for the lr schedule)."""
  if kind(config) == 'ccl':
    return CclStep(config, image_shape, num_classes, batch, steps, threads, total_steps)
  return Step(config, image_shape, num_classes, batch, steps, threads)


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


def _hwc(image_shape) -> tuple[int, int, int]:
  return tuple(image_shape) if len(image_shape) == 3 else (*image_shape, 1)


def _sizes(h: int, w: int, blocks: int) -> list[tuple[int, int]]:
  """Spatial size of the input and of each block's output ('SAME' 2×2 pools: ceil division)."""
  sizes = [(h, w)]
  for _ in range(blocks):
    h, w = -(-h // 2), -(-w // 2)
    sizes.append((h, w))
  return sizes


def network(config, image_shape: tuple[int, ...], num_classes: int):
  """The torch module of `config.model` ('mlp' or 'cnn'), NCHW input."""
  import torch.nn as tnn

  h, w, c = _hwc(image_shape)
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


def feedback_network(config, image_shape: tuple[int, ...], num_classes: int):
  """The feedback net's layers, no biases: entry i is our `layer_{i+1}`. MLP: Linear V_{l+1} from
  pair l+1's width (K for the top) to pair l's. CNN: Conv3×3 from block l+1's channels to block
  l's (l = 0: the image's), then the top Linear K → the last block's C·H·W."""
  import torch.nn as tnn

  h, w, c = _hwc(image_shape)
  if config.model == 'mlp':
    widths = [h * w * c] + [int(v) for v in config.mlp.hidden] + [num_classes]
    return tnn.ModuleList(
      tnn.Linear(widths[l + 1], widths[l], bias=False) for l in range(len(widths) - 1)
    )
  widths = [c] + [int(v) for v in config.cnn.channels]
  n = len(widths) - 1
  top_h, top_w = _sizes(h, w, n)[n]
  convs = [tnn.Conv2d(widths[l + 1], widths[l], 3, padding=1, bias=False) for l in range(n)]
  return tnn.ModuleList([*convs, tnn.Linear(num_classes, widths[n] * top_h * top_w, bias=False)])


class _Timed:
  """`steps` training steps (`step()`) per call, timed per thread count in `times`."""

  def _start(self, steps: int, threads) -> None:
    self.steps, self.threads = steps, tuple(threads)
    self.times: dict[int, list[float]] = {t: [] for t in self.threads}
    for t in self.threads:  # warm-up
      self.call(t)

  def step(self) -> None:
    raise NotImplementedError

  def call(self, threads: int) -> float:
    self.torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for _ in range(self.steps):
      self.step()
    return time.perf_counter() - t0

  def time_call(self) -> None:
    for t in self.threads:
      self.times[t].append(self.call(t))


class Step(_Timed):
  """`steps` backprop training steps of the twin network per call, timed per thread count."""

  kind = 'bp'

  def __init__(self, config, image_shape, num_classes: int, batch: int, steps: int, threads):
    import torch

    torch.manual_seed(0)
    self.torch = torch
    self.net = network(config, image_shape, num_classes)
    opt = config.optimizer.forward
    self.clip = float(opt.clip)
    self.opt = torch.optim.SGD(
      self.net.parameters(),
      lr=float(opt.lr),
      momentum=float(opt.get('momentum', 0.0)),
      weight_decay=float(opt.get('weight_decay', 0.0)),
    )
    h, w, c = _hwc(image_shape)
    self.x = torch.randn(batch, c, h, w)
    self.y = torch.randint(0, num_classes, (batch,))
    self.loss = torch.nn.CrossEntropyLoss()
    self._start(steps, threads)

  def step(self) -> None:
    self.opt.zero_grad(set_to_none=True)
    self.loss(self.net(self.x), self.y).backward()
    if self.clip > 0:
      self.torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
    self.opt.step()


def schedule(c, total_steps: int):
  """`optim.schedule(c, total_steps)` in plain Python: step count → lr."""
  lr, warm = float(c.lr), int(c.warmup_steps)
  n = max(1, total_steps - warm)
  milestones = sorted({max(1, round(float(m) * (total_steps - warm))) for m in c.milestones})

  def main(k: int) -> float:
    if c.schedule == 'cosine':
      alpha, k = float(c.min_lr) / lr, min(k, n)
      return lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * k / n)) + alpha)
    if c.schedule == 'step':
      return lr * float(c.decay_factor) ** sum(k >= m for m in milestones)
    return lr

  return lambda k: lr * k / warm if k < warm else main(k - warm)


class _Tree:
  """One parameter tree's optimizer, as `optim.make` chains it for SGD: (gradient centralisation)
  → clip to the tree's global norm → weight decay → SGD with momentum at the scheduled lr."""

  def __init__(self, torch, params, c, total_steps: int):
    self.torch, self.params = torch, list(params)
    self.clip, self.centralize = float(c.clip), bool(c.get('grad_centralization', False))
    self.lr = schedule(c, total_steps)
    self.opt = torch.optim.SGD(
      self.params,
      lr=float(c.lr),
      momentum=float(c.momentum),
      weight_decay=float(c.weight_decay),
    )

  def update(self, count: int) -> None:
    grads = [p.grad for p in self.params if p.grad is not None]
    if self.centralize:  # each output unit's mean (torch: dim 0 is the output)
      for g in grads:
        if g.ndim >= 2:
          g.sub_(g.mean(dim=tuple(range(1, g.ndim)), keepdim=True))
    if self.clip > 0:  # optax.clip_by_global_norm: × clip/‖g‖ where ‖g‖ > clip
      la = self.torch.linalg
      norm = la.vector_norm(self.torch.stack([la.vector_norm(g) for g in grads]))
      scale = (self.clip / norm).clamp(max=1.0)
      for g in grads:
        g.mul_(scale)
    for group in self.opt.param_groups:
      group['lr'] = self.lr(count)
    self.opt.step()


class CclStep(_Timed):
  """`steps` CCL training steps per call (our `CounterCurrent` step, see the module docstring),
  timed per thread count."""

  kind = 'ccl'

  def __init__(
    self, config, image_shape, num_classes, batch: int, steps: int, threads, total_steps=1
  ):
    import torch

    torch.manual_seed(0)
    self.torch, self.model, self.k = torch, config.model, num_classes
    self.image_shape = _hwc(image_shape)
    self.net = network(config, image_shape, num_classes)
    seq = torch.nn.Sequential
    mods = list(self.net)  # the same modules as `network`'s, called block by block
    if config.model == 'mlp':  # Flatten, [Linear, φ] × hidden, Linear, output φ
      self.stem, body, self.head, per = mods[0], mods[1:-2], seq(*mods[-2:]), 2
    else:  # [Conv, φ, MaxPool] × channels, Flatten, Linear, output φ
      self.stem, body, self.head, per = seq(), mods[:-3], seq(*mods[-3:]), 3
    self.blocks = [seq(*body[i : i + per]) for i in range(0, len(body), per)]
    self.feedback = feedback_network(config, image_shape, num_classes)
    h, w, ch = self.image_shape
    self.sizes = _sizes(h, w, len(self.blocks))
    if config.model == 'cnn':  # the last block's map, flattened into the classifier
      self.top = (*self.sizes[-1], int(config.cnn.channels[-1]) if self.blocks else ch)
    self.act = _activation(config[config.model].activation)
    c = config.ccl
    self.c, self.s = float(c.loss_scale), float(c.self_scale)
    self.normalized = config.model == 'cnn'  # counter_current.NORMALIZED
    self.warmup = int(c.loss_warmup_steps) if self.normalized else 0
    self.loss_kind = config.loss
    self.trees = [
      _Tree(torch, net.parameters(), config.optimizer[t], total_steps)
      for t, net in (('forward', self.net), ('feedback', self.feedback))
    ]
    self.count = 0  # our state.step
    self.eye = torch.eye(num_classes)
    self.set_batch(torch.randn(batch, ch, h, w), torch.randint(0, num_classes, (batch,)))
    self._start(steps, threads)

  def set_batch(self, x, y) -> None:
    """The batch the steps train on: images NCHW (B, C, H, W), integer labels (B,)."""
    torch = self.torch
    self.x, self.y = x, y
    self.onehot = torch.nn.functional.one_hot(y, self.k).to(x.dtype)
    self.eye_b = torch.eye(x.shape[0])

  def prototypes(self) -> list:
    """[g_0, ..., g_L] of the feedback net on the K×K identity, every layer's input detached."""
    f, act, n = self.feedback, self.act, len(self.feedback) - 1
    out = [None] * (n + 1)
    if self.model == 'mlp':
      g = self.eye
      for l in reversed(range(n + 1)):
        g = f[l](g.detach())
        g = g if l == 0 else act(g)
        out[l] = g
      return out
    h, w = self.sizes[n]
    g = act(f[n](self.eye)).reshape(self.k, -1, h, w)  # NCHW (our NHWC layout: `load_jax`)
    out[n] = g
    for l in reversed(range(n)):
      g = self.torch.nn.functional.interpolate(g.detach(), self.sizes[l], mode='nearest-exact')
      g = f[l](g)
      out[l] = g if l == 0 else act(g)
    return out

  def task_loss(self, out):
    if self.loss_kind == 'ce':
      return self.torch.nn.functional.cross_entropy(out, self.y)
    p = out.clamp(1e-7, 1 - 1e-7)  # 'bce': summed over classes, mean over the batch
    y = self.onehot
    return -(y * self.torch.log(p) + (1 - y) * self.torch.log1p(-p)).sum(-1).mean()

  def pair_loss(self, h, g):
    h, g = h.reshape(h.shape[0], -1), g.reshape(g.shape[0], -1)
    if not self.normalized:  # prototype_loss
      return (256.0 * self.c / h.shape[1]) * ((h @ g.T - self.onehot) ** 2).mean()
    unit = lambda v: v * self.torch.rsqrt((v * v).sum(1, keepdim=True).clamp(min=1e-16))
    hn, gn = unit(h), unit(g)
    cross = ((hn @ gn.T - self.onehot) ** 2).mean()
    self_h = ((hn @ hn.T - self.eye_b) ** 2).mean()
    self_g = ((gn @ gn.T - self.eye) ** 2).mean()
    return self.c * cross + self.s * (self_h + self_g)

  def losses(self):
    """(total, task loss, [pair losses]): `CounterCurrent.losses`'s objective."""
    h = self.stem(self.x)
    acts = [h]
    for block in self.blocks:
      h = block(h.detach())
      acts.append(h)
    out = self.head(h.detach())
    task = self.task_loss(out)
    terms = [self.pair_loss(h, g) for h, g in zip(acts, self.prototypes())]
    return task + sum(terms), task, terms

  def step(self) -> None:
    for p in (*self.net.parameters(), *self.feedback.parameters()):
      p.grad = None
    total = self.losses()[0]
    if self.warmup:  # base.loss_warmup: every gradient × min(1, (step+1)/N)
      total = total * min(1.0, (self.count + 1) / self.warmup)
    total.backward()
    for tree in self.trees:
      tree.update(self.count)
    self.count += 1

  def load_jax(self, forward: dict, feedback: dict) -> None:
    """Copies our parameter trees (`params['forward']`, `params['feedback']`) into the twin: conv
    kernels HWIO → OIHW, dense kernels transposed, and where a dense layer meets a flattened NHWC
    map (the MLP's input, the conv net's classifier, the feedback top) its rows or columns are
    put in NCHW order."""
    import numpy as np

    torch = self.torch

    def order(h, w, c):  # NCHW feature j is NHWC feature order[j]
      return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()

    def weight(kernel, rows=None, cols=None):
      k = np.asarray(kernel, np.float32)
      if k.ndim == 4:
        return k.transpose(3, 2, 0, 1)
      k = k if rows is None else k[rows]
      k = k if cols is None else k[:, cols]
      return k.T

    def put(module, p, **kw):
      module.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(weight(p['kernel'], **kw))))
      if 'bias' in p:
        module.bias.data.copy_(torch.from_numpy(np.asarray(p['bias'], np.float32)))

    flat_in = order(*self.image_shape)
    n = len(self.blocks)
    top = order(*self.top) if self.model == 'cnn' else None
    layers = [m for m in self.net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for i, m in enumerate(layers):
      rows = None
      if isinstance(m, torch.nn.Linear) and (self.model == 'mlp' and i == 0):
        rows = flat_in
      elif isinstance(m, torch.nn.Linear) and self.model == 'cnn':
        rows = top
      put(m, forward[f'layer_{i + 1}'], rows=rows)
    for i, m in enumerate(self.feedback):
      cols = None
      if self.model == 'mlp' and i == 0:
        cols = flat_in
      elif self.model == 'cnn' and i == n:
        cols = top
      put(m, feedback[f'layer_{i + 1}'], cols=cols)


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
