"""Alignment metrics: weight angles, delta angles, norm ratios (SPEC §2) and linear CKA (SPEC §1.4).

Layers are named by their module path ('layer_1', ...). Every function is pure and jit-able and
returns scalars, so a rule's `analyze` can hand them straight to the training loop's log.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Path = tuple[str, ...]


def angle_degrees(a: jax.Array, b: jax.Array) -> jax.Array:
  """Angle in degrees between two tensors, each flattened to one vector (90 if either is zero)."""
  a, b = jnp.ravel(a).astype(jnp.float32), jnp.ravel(b).astype(jnp.float32)
  denom = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  cos = jnp.where(denom > 0, jnp.dot(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)
  return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def names(key_path) -> Path:
  """A jax key path (DictKey, ...) as a tuple of plain names."""
  return tuple(str(getattr(k, 'key', k)) for k in key_path)


def leaves_by_path(tree: PyTree) -> dict[Path, jax.Array]:
  """{('layer_1', 'kernel'): leaf, ...} for a nested-dict tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {names(path): v for path, v in flat}


def lookup(tree: PyTree, path: Path) -> jax.Array:
  for k in path:
    tree = tree[k]
  return tree


def layer_name(path: Path) -> str:
  """The layer a leaf belongs to: its path without the last key ('kernel', 'preact')."""
  return '/'.join(path[:-1])


def feedback_pairs(forward: PyTree, feedback: PyTree) -> list[tuple[str, jax.Array, jax.Array]]:
  """(layer name, W, B) for every feedback kernel, in layer order (input to output)."""
  pairs = [(layer_name(p), lookup(forward, p), b) for p, b in leaves_by_path(feedback).items()]
  return sorted(pairs, key=lambda t: _natural(t[0]))


def backprop_feedback(forward: PyTree, feedback: PyTree) -> PyTree:
  """A feedback tree holding W for every B (B has W's layout): the feedback that is exactly BP."""
  return jax.tree_util.tree_map_with_path(lambda path, _: lookup(forward, names(path)), feedback)


def weight_metrics(forward: PyTree, feedback: PyTree) -> dict[str, jax.Array]:
  """weight_angle/<layer> = ∠(vec W, vec B) in degrees; norm_ratio/<layer> = ‖B‖/‖W‖.

  B has W's layout, so this is the angle between the feedback path and backprop's (∠(Wᵀ, Bᵀ) when
  both are read as backward matrices: the same number).
  """
  out = {}
  for name, w, b in feedback_pairs(forward, feedback):
    out[f'weight_angle/{name}'] = angle_degrees(w, b)
    out[f'norm_ratio/{name}'] = jnp.linalg.norm(b.ravel()) / jnp.maximum(
      jnp.linalg.norm(w.ravel()), 1e-12
    )
  return out


def delta_angles(
  model,
  forward: PyTree,
  feedback: PyTree,
  images: jax.Array,
  loss_fn: Callable[[jax.Array], jax.Array],
) -> dict[str, jax.Array]:
  """delta_angle/<layer> for every hidden layer l: the angle between the rule's error signal at
  the layer's pre-activation, δ_l = (B_{l+1} δ_{l+1}) ⊙ φ'(z_l), and backprop's for the same
  upstream error, (W_{l+1} δ_{l+1}) ⊙ φ'(z_l) — δ_{l+1} the rule's own (SPEC §2), over the batch.

  Backprop's is read with only layer l+1's B replaced by its W: the layers above still send the
  rule's error. `model` is a flax module of feedback-aware layers (they mark their
  pre-activations with `perturb('preact')`); `loss_fn` maps its outputs to the training loss.
  """
  variables = {'params': forward, 'feedback': feedback}
  _, probes = model.apply(variables, images, mutable=['perturbations'])
  probes = probes['perturbations']

  def deltas(fb):
    def loss(p):
      out = model.apply({'params': forward, 'feedback': fb, 'perturbations': p}, images)[0]
      return loss_fn(out)

    return leaves_by_path(jax.grad(loss)(probes))

  rule = deltas(feedback)
  paths = sorted(rule, key=lambda p: _natural(layer_name(p)))
  kernels = sorted(leaves_by_path(feedback), key=lambda p: _natural(layer_name(p)))
  out = {}
  for here, above in zip(paths[:-1], kernels[1:]):  # the output layer's δ is the same for both
    one_bp = jax.tree_util.tree_map_with_path(
      lambda path, b: lookup(forward, names(path)) if names(path) == above else b, feedback
    )
    out[f'delta_angle/{layer_name(here)}'] = angle_degrees(rule[here], deltas(one_bp)[here])
  return out


def update_angles(rule: PyTree, backprop: PyTree) -> dict[str, jax.Array]:
  """update_angle/<layer> = ∠(the rule's kernel update, BP's) in degrees, for every kernel."""
  ours, bp = leaves_by_path(rule), leaves_by_path(backprop)
  return {
    f'update_angle/{layer_name(p)}': angle_degrees(ours[p], bp[p])
    for p in sorted(ours, key=lambda p: _natural(layer_name(p)))
    if p[-1] == 'kernel'
  }


def unit_rows(x: jax.Array, centre: bool = False) -> jax.Array:
  """Rows flattened to float32 (centred first if `centre`) and L2-normalised; the norm is floored
  at 1e-8, so a zero row stays zero with a finite gradient."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  if centre:
    x = x - x.mean(axis=1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), 1e-16))


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA of two representations of the same n examples, x (n, p) and y (n, q):
  ‖ỹᵀx̃‖²_F / (‖x̃ᵀx̃‖_F ‖ỹᵀỹ‖_F) with columns centred; in [0, 1], invariant to rotations and
  isotropic scaling of either side (Kornblith et al. 2019). 0 if either side is constant."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  y = y.reshape(y.shape[0], -1).astype(jnp.float32)
  x, y = x - x.mean(0), y - y.mean(0)
  n, p, q = x.shape[0], x.shape[1], y.shape[1]
  if n * (p + q) < p * p + q * q + p * q:  # wide features (conv maps): the n×n Gram form
    gram = lambda a: jnp.einsum('ni,mi->nm', a, a, precision='highest')
    k, l = gram(x), gram(y)
    num, den = jnp.sum(k * l), jnp.linalg.norm(k) * jnp.linalg.norm(l)
  else:
    dot = lambda a, b: jnp.einsum('ni,nj->ij', a, b, precision='highest')
    num = jnp.sum(dot(y, x) ** 2)
    den = jnp.linalg.norm(dot(x, x)) * jnp.linalg.norm(dot(y, y))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
