"""The one training loop every rule runs through: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccl_jax import config as config_lib
from ccl_jax import data as data_lib
from ccl_jax import rules
from ccl_jax.checkpoint import Checkpointer, config_to_json
from ccl_jax.errors import UserError
from ccl_jax.parallel import DataParallel
from ccl_jax.rules.base import Rule, Task, task_loss
from ccl_jax.state import TrainState


# -- pure pieces --------------------------------------------------------------------------------
def make_chunk(update, unroll: int = 1, augment=None):
  """Fuses several `update` steps into one compiled call; batches are gathered on device.

  `unroll` is `lax.scan`'s: 0 inlines every step (no loop). XLA:CPU runs convolutions inside a
  while loop ~2× slower than inlined, so conv configs use a few fully unrolled steps per call.
  `augment` (`data.augmenter`) transforms each gathered batch on device, keyed by the state's key
  and step and by each example's index.
  """
  def chunk(state: TrainState, images, labels, idx):
    def body(state, batch_idx):
      x = images[batch_idx]
      if augment is not None:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), data_lib.AUGMENT_STREAM)
        x = augment(x, batch_idx, key)
      return update(state, {'image': x, 'label': labels[batch_idx]})
    return jax.lax.scan(body, state, idx, unroll=unroll or True)  # metrics stacked per step
  return chunk


def epoch_indices(rng: jax.Array, epoch: int, n: int, batch_size: int, shuffle: bool) -> np.ndarray:
  """(steps_per_epoch, batch_size) example indices of one epoch; a function of (rng, epoch)."""
  steps = n // batch_size
  order = (jax.random.permutation(jax.random.fold_in(rng, epoch), n) if shuffle
           else jnp.arange(n))
  return np.asarray(order[:steps * batch_size]).reshape(steps, batch_size)


def make_eval(rule: Rule, loss_kind: str):
  """Jitted (params, extra, images, labels, mask) -> (summed loss, correct count)."""
  @jax.jit
  def evaluate(params, extra, images, labels, mask):
    out = rule.predict(params, images, extra)
    per = jax.vmap(lambda o, y: task_loss(o[None], y[None], loss_kind))(out, labels)
    correct = (jnp.argmax(out, -1) == labels)
    return jnp.sum(per * mask), jnp.sum(correct * mask)
  return evaluate


def evaluate_split(evaluate, params, extra, split: data_lib.Split, batch_size: int) -> dict:
  """Loss and accuracy over a whole split, in fixed-size padded batches (one compilation)."""
  n = len(split)
  if n == 0:
    return {'loss': float('nan'), 'accuracy': float('nan')}
  bs = min(batch_size, n)
  total_loss = total_correct = 0.0
  for start in range(0, n, bs):
    x, y = split.images[start:start + bs], split.labels[start:start + bs]
    mask = np.ones(bs, np.float32)
    if len(y) < bs:
      pad = bs - len(y)
      mask[len(y):] = 0
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    loss, correct = evaluate(params, extra, x, y, mask)
    total_loss += float(loss)
    total_correct += float(correct)
  return {'loss': total_loss / n, 'accuracy': total_correct / n}


# -- logging ------------------------------------------------------------------------------------
class MetricsLog:
  """metrics.jsonl: one JSON object per evaluation (only process 0 writes)."""

  def __init__(self, workdir: str, write: bool):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.write = write

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    out = []
    for line in open(self.path):
      try:
        out.append(json.loads(line))
      except ValueError:
        pass  # a line cut by a kill
    return out

  def truncate_after(self, step: int) -> None:
    """On resume: drop records written after the checkpoint we resume from."""
    if self.write and os.path.exists(self.path):
      keep = [r for r in self.records() if r.get('step', 0) <= step and not r.get('final')]
      with open(self.path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)

  def add(self, record: dict) -> None:
    if self.write:  # NaN/inf (e.g. no validation split) are written as null: valid JSON
      record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in record.items()}
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def _scalar(x) -> float:
  return float(np.asarray(x))


def _first_nonfinite(metrics: dict[str, np.ndarray]) -> tuple[int, str] | None:
  """(step offset, metric name) of the first non-finite loss in stacked per-step metrics."""
  loss = np.asarray(metrics['loss'])
  bad = np.flatnonzero(~np.isfinite(loss))
  if not len(bad):
    return None
  i = int(bad[0])
  culprits = [k for k in sorted(metrics) if k != 'loss' and 'loss' in k
              and not np.isfinite(np.asarray(metrics[k])[i])]
  return i, (culprits[0] if culprits else 'loss')


def summary_line(rec: dict) -> str:
  def num(key, fmt):
    v = rec.get(key)
    return 'n/a' if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)
  return (f"final: test_accuracy={num('test_accuracy', '.4f')} (parameters of epoch "
          f"{rec['best_epoch']}, val_loss={num('best_val_loss', '.4f')}); "
          f"{rec['epoch']} epochs, {rec['step']} steps, {num('samples_per_second', '.0f')} samples/s")


# -- the loop -----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.rule` on `config.dataset`, evaluating and checkpointing each epoch.

  Resumes from `workdir/checkpoints` when present; a finished run prints its results instead.
  Returns the final record (test accuracy of the parameters with the lowest validation loss).
  """
  config_lib.validate(config)
  config = ml_collections.FrozenConfigDict(config)  # frozen before anything is traced
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  log = MetricsLog(workdir, is_main)
  cfg_json = config_to_json(config)

  previous = [n for n in ('checkpoints', 'metrics.jsonl', 'config.json', 'plots')
              if os.path.exists(os.path.join(workdir, n))]
  if config.force_retrain and previous and is_main:
    aside = os.path.join(workdir, f'previous-{time.strftime("%Y%m%d-%H%M%S")}')
    os.makedirs(aside)
    for name in previous:
      shutil.move(os.path.join(workdir, name), aside)
    print(f'force_retrain: moved the previous run to {aside}')

  data = data_lib.load(config)
  para = DataParallel(config.parallel)
  para.check_batch(config.batch_size)
  steps_per_epoch = len(data.train) // config.batch_size
  total_steps = steps_per_epoch * config.num_epochs
  task = Task(data.num_classes, data.image_shape, total_steps)
  rule = rules.get(config, task, axis_name=para.axis_name)

  init_rng, data_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  sample = {'image': jnp.asarray(data.train.images[:config.batch_size // para.n]),
            'label': jnp.asarray(data.train.labels[:config.batch_size // para.n])}
  state = rule.init(init_rng, sample)
  best = jax.device_get({'params': state.params, 'extra': state.extra})  # host copy: state is donated
  meta = {'epoch': 0, 'best_epoch': 0, 'best_val_loss': float('inf')}

  ckpt = Checkpointer(workdir, config.keep_checkpoints)  # every process joins; Orbax coordinates
  restored = ckpt.restore({'state': state, 'best': best}, cfg_json)
  if restored is None:
    log.truncate_after(0)  # records of a run killed before its first checkpoint
  else:
    tree, meta = restored
    state, best = tree['state'], tree['best']
    final = [r for r in log.records() if r.get('final')]
    if int(state.step) >= total_steps and final and final[-1].get('epoch') == config.num_epochs:
      print(f'{workdir} already holds a finished run; set --config.force_retrain=True to redo it')
      print(summary_line(final[-1]))
      return final[-1]
    log.truncate_after(int(state.step))
    print(f'resumed from {ckpt.directory} at step {int(state.step)} (epoch {meta["epoch"]})')
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(cfg_json, f, indent=2)

  images, labels = para.put_data(data.train.images), para.put_data(data.train.labels)
  step_fn = para.compile(make_chunk(rule.update, config.scan_unroll,
                                     data_lib.augmenter(config)))
  evaluate = make_eval(rule, config.loss)
  analysis_batch = {'image': jnp.asarray(data.val.images[:config.analysis_batch_size]
                                         if len(data.val) else data.train.images[:256]),
                    'label': jnp.asarray(data.val.labels[:config.analysis_batch_size]
                                         if len(data.val) else data.train.labels[:256])}
  analyze = jax.jit(rule.analyze)
  per_call = config.steps_per_call or steps_per_epoch
  if config.checkpoint_every_steps:
    per_call = min(per_call, config.checkpoint_every_steps)
  ckpt_every = config.checkpoint_every_epochs
  state = para.put_state(state)
  compiled: dict[int, Any] = {}
  step = int(para.get_state(state).step)
  last_saved = step
  sps = float('nan')

  for epoch in range(step // steps_per_epoch, config.num_epochs):
    idx = epoch_indices(data_rng, epoch, len(data.train), config.batch_size, config.shuffle)
    offset = step - epoch * steps_per_epoch
    bar = _progress(config, epoch, steps_per_epoch, offset)
    train_time, steps_run = 0.0, 0
    # Running sums of every per-step training metric (restored from a mid-epoch checkpoint).
    partial = meta.pop('partial_epoch', None) or {'sums': {}, 'count': 0}
    sums, count = dict(partial['sums']), partial['count']
    while offset < steps_per_epoch:
      n = min(per_call, steps_per_epoch - offset)
      chunk_idx = para.split_idx(idx[offset:offset + n])
      if n not in compiled:  # compile ahead of time, so it is not counted as training time
        t0 = time.perf_counter()
        compiled[n] = para.ahead_of_time(step_fn, state, images, labels, chunk_idx)
        print(f'compiled a {n}-step call in {time.perf_counter() - t0:.1f}s', flush=True)
      t0 = time.perf_counter()
      state, metrics = compiled[n](state, images, labels, chunk_idx)
      metrics = para.get_metrics(metrics)  # one host sync per call
      elapsed = time.perf_counter() - t0
      train_time += elapsed
      bad = _first_nonfinite(metrics)
      if bad is not None:
        at = step + bad[0] + 1
        raise UserError(f'non-finite loss at step {at} (epoch {epoch + 1}, rule {config.rule}), '
                        f'first in {bad[1]}; last good checkpoint kept in {ckpt.directory} '
                        f'(steps {ckpt.steps() or "none"}); lower the learning rate')
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
      count += n
      steps_run += n
      step += n
      offset += n
      if (config.checkpoint_every_steps and offset < steps_per_epoch
          and step - last_saved >= config.checkpoint_every_steps):
        ckpt.save(step, {'state': para.get_state(state), 'best': best},
                  {**meta, 'config': cfg_json,
                   'partial_epoch': {'sums': sums, 'count': count}})
        last_saved = step
      if bar is not None:
        bar.update(n)
        bar.set_postfix(loss=f'{float(np.mean(metrics["loss"])):.4f}',
                        samples_s=f'{n * config.batch_size / max(elapsed, 1e-9):.0f}')
    sps = steps_run * config.batch_size / max(train_time, 1e-9)
    if bar is not None:
      bar.close()

    host_state = para.get_state(state)
    val = evaluate_split(evaluate, host_state.params, host_state.extra, data.val, config.eval_batch_size)
    test = evaluate_split(evaluate, host_state.params, host_state.extra, data.test, config.eval_batch_size)
    record = {'step': step, 'epoch': epoch + 1,
              'train_loss': sums['loss'] / count,
              'val_loss': val['loss'], 'val_accuracy': val['accuracy'],
              'test_loss': test['loss'], 'test_accuracy': test['accuracy'],
              'samples_per_second': sps, 'epoch_train_seconds': train_time}
    record.update({f'train_{k}': v / count for k, v in sums.items() if k != 'loss'})
    record.update({k: _scalar(v) for k, v in analyze(host_state, analysis_batch).items()})
    if not len(data.val) or val['loss'] < meta['best_val_loss']:
      best = jax.device_get({'params': host_state.params, 'extra': host_state.extra})
      meta = {**meta, 'best_epoch': epoch + 1, 'best_val_loss': val['loss']}
    meta = {**meta, 'epoch': epoch + 1, 'config': cfg_json}
    log.add(record)
    print(f"epoch {epoch + 1}/{config.num_epochs}: train_loss {record['train_loss']:.4f} "
          f"val_loss {val['loss']:.4f} val_acc {val['accuracy']:.4f} "
          f"test_acc {test['accuracy']:.4f} ({sps:.0f} samples/s)", flush=True)
    if (epoch + 1) % ckpt_every == 0 or epoch + 1 == config.num_epochs:
      ckpt.save(step, {'state': host_state, 'best': best}, meta)
      last_saved = step

  final_test = evaluate_split(evaluate, best['params'], best['extra'], data.test, config.eval_batch_size)
  final = {'step': step, 'epoch': config.num_epochs, 'final': True,
           'test_accuracy': final_test['accuracy'], 'test_loss': final_test['loss'],
           'best_epoch': meta['best_epoch'], 'best_val_loss': meta['best_val_loss'],
           'samples_per_second': sps}
  log.add(final)
  if is_main:
    from ccl_jax import report
    final_plot = report.plot_run(workdir, f'{config.rule} · {config.model} · {config.dataset}')
    print(f'plots: {final_plot}')
  print(summary_line(final), flush=True)
  return final


def _progress(config, epoch: int, total: int, done: int):
  import sys
  if not config.progress or not sys.stderr.isatty():
    return None  # the per-epoch line is the progress report in logs
  from tqdm import tqdm
  return tqdm(total=total, initial=done, desc=f'epoch {epoch + 1}/{config.num_epochs}',
              unit='step', leave=False, mininterval=1.0, dynamic_ncols=True)
