"""The one training loop every rule runs through: `train_and_evaluate(config, workdir)`.

In parts: `Run` (what a run is built from), `resume` (pick up a checkpoint or start), `train_epoch`
(compiled multi-step calls over one epoch), `evaluate_epoch` (validation, test and alignment
metrics) and `finish` (the best-by-validation test record and the plots).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccl_jax import checkpoint, models, snapshots
from ccl_jax import config as config_lib
from ccl_jax import data as data_lib
from ccl_jax import step as step_lib
from ccl_jax import stream as stream_lib
from ccl_jax.errors import UserError
from ccl_jax.parallel import DataParallel
from ccl_jax.rules.base import Rule, Task, task_loss
from ccl_jax.state import TrainState, stream


# -- pure pieces --------------------------------------------------------------------------------
def make_chunk(update, unroll: int = 1, augment=None):
  """Fuses several `update` steps into one compiled call; batches are gathered on device.

  `unroll` is `lax.scan`'s: 0 inlines every step (no loop). XLA:CPU runs convolutions inside a
  while loop ~2× slower than inlined, so conv configs use a few fully unrolled steps per call.
  `augment` (`data.augmenter`) transforms each gathered batch on device, keyed by the state's
  augmentation stream at the step and by each example's index.
  """

  def chunk(state: TrainState, images, labels, idx):
    def body(state, batch_idx):
      x = images[batch_idx]
      if augment is not None:
        x = augment(x, batch_idx, stream(state.rng, 'augment', state.step))
      return update(state, {'image': x, 'label': labels[batch_idx]})

    return jax.lax.scan(body, state, idx, unroll=unroll or True)  # metrics stacked per step

  return chunk


def make_stream_chunk(update, unroll: int = 1):
  """`make_chunk` for the streaming pipeline: the steps' batches come stacked, (steps, B, ...),
  already decoded and augmented (`stream.TrainFeed`)."""

  def chunk(state: TrainState, images, labels):
    def body(state, batch):
      return update(state, {'image': batch[0], 'label': batch[1]})

    return jax.lax.scan(body, state, (images, labels), unroll=unroll or True)

  return chunk


class MemoryFeed:
  """The memory pipeline's batches for `train_epoch`: chunks of example indices into the split
  resident on the devices (`arrays`), in the order `epoch_indices` draws."""

  def __init__(self, run: Run, arrays: tuple):
    self.run, self.arrays, self.epoch, self.idx = run, arrays, None, None

  def take(self, epoch: int, offset: int, n: int) -> tuple[tuple, None]:
    """The chunk's arguments for steps offset..offset+n of `epoch` (and no pipeline state)."""
    run, c = self.run, self.run.config
    if epoch != self.epoch:
      self.epoch = epoch
      self.idx = epoch_indices(
        run.data_rng, epoch, len(run.data.train), c.batch_size, c.data.shuffle
      )
    return (*self.arrays, run.para.split_idx(self.idx[offset : offset + n])), None

  def close(self) -> None:
    pass


def epoch_indices(rng: jax.Array, epoch: int, n: int, batch_size: int, shuffle: bool) -> np.ndarray:
  """(steps_per_epoch, batch_size) example indices of one epoch; a function of (rng, epoch)."""
  steps = n // batch_size
  order = jax.random.permutation(jax.random.fold_in(rng, epoch), n) if shuffle else jnp.arange(n)
  return np.asarray(order[: steps * batch_size]).reshape(steps, batch_size)


# What evaluation reports besides the loss, per task kind (`Task.kind`, from the model module).
EVAL_METRIC = {'classification': 'accuracy', 'reconstruction': 'mse'}


def make_eval(rule: Rule, loss_kind: str):
  """Jitted (params, extra, images, labels, mask) -> {'loss': summed loss, metric: sum}: the
  metric is the correct count for classification; for reconstruction the summed per-image pixel
  MSE of the outputs against the images, which is also the loss (so selection by validation loss
  is selection by validation MSE)."""
  metric = EVAL_METRIC[rule.task.kind]

  @jax.jit
  def evaluate(params, extra, images, labels, mask):
    out = rule.predict(params, images, extra)
    if metric == 'mse':
      per = jnp.mean((out - images) ** 2, axis=tuple(range(1, out.ndim)))
      return {'loss': jnp.sum(per * mask), 'mse': jnp.sum(per * mask)}
    per = jax.vmap(lambda o, y: task_loss(o[None], y[None], loss_kind))(out, labels)
    correct = jnp.argmax(out, -1) == labels
    return {'loss': jnp.sum(per * mask), 'accuracy': jnp.sum(correct * mask)}

  evaluate.metric = metric
  return evaluate


def evaluate_split(evaluate, params, extra, split: data_lib.Split, batch_size: int) -> dict:
  """Loss and the task's metric (`make_eval`) over a whole split, averaged per example, in
  fixed-size padded batches (one compilation); a streamed split (`stream.StreamSplit`) is read
  batch by batch."""
  n = len(split)
  if n == 0:
    return {'loss': float('nan'), getattr(evaluate, 'metric', 'accuracy'): float('nan')}
  bs = min(batch_size, n)
  totals = {}
  for x, y in split.batches(bs):
    mask = np.ones(bs, np.float32)
    if len(y) < bs:
      pad = bs - len(y)
      mask[len(y) :] = 0
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    for k, v in evaluate(params, extra, x, y, mask).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {k: v / n for k, v in totals.items()}


# -- logging ------------------------------------------------------------------------------------
class MetricsLog:
  """metrics.jsonl: one JSON object per evaluation, mirrored as TensorBoard scalars (tensorboardX,
  no TensorFlow) in one event file beside it; only process 0 writes either.

  The event file follows metrics.jsonl: when a run starts or resumes (`truncate_after`) it is
  rewritten from the records kept, so a workdir holds one event file whose steps match the log.
  Scalars are tagged by record key at the record's `step`; the final record's under `final/`.
  """

  def __init__(self, workdir: str, write: bool):
    self.workdir = workdir
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.write = write
    self._events = None  # the SummaryWriter, opened on first use

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
    if not self.write:
      return
    keep = []
    if os.path.exists(self.path):
      keep = [r for r in self.records() if r.get('step', 0) <= step and not r.get('final')]
      with open(self.path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
    self._restart_events(keep)

  def add(self, record: dict) -> None:
    if self.write:  # NaN/inf (e.g. no validation split) are written as null: valid JSON
      record = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
      }
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      self._scalars(record)
      if self._events is not None:
        self._events.flush()
        if record.get('final'):
          self._events.close()
          self._events = None

  def _restart_events(self, records: list[dict]) -> None:
    """Replaces the workdir's event files by one holding `records` (derived data: the log keeps
    everything)."""
    if self._events is not None:
      self._events.close()
      self._events = None
    for name in os.listdir(self.workdir):
      if name.startswith('events.out.tfevents.'):
        os.remove(os.path.join(self.workdir, name))
    for r in records:
      self._scalars(r)
    if self._events is not None:
      self._events.flush()

  def _scalars(self, record: dict) -> None:
    if self._events is None:
      from tensorboardX import SummaryWriter

      self._events = SummaryWriter(self.workdir, flush_secs=3600)
    prefix = 'final/' if record.get('final') else ''
    for k, v in record.items():
      if k not in ('step', 'epoch', 'final') and isinstance(v, (int, float)):
        if not isinstance(v, bool):
          self._events.add_scalar(prefix + k, v, global_step=int(record.get('step', 0)))


def _first_nonfinite(metrics: dict[str, np.ndarray]) -> tuple[int, str] | None:
  """(step offset, metric name) of the first non-finite loss in stacked per-step metrics."""
  loss = np.asarray(metrics['loss'])
  bad = np.flatnonzero(~np.isfinite(loss))
  if not len(bad):
    return None
  i = int(bad[0])
  culprits = [
    k
    for k in sorted(metrics)
    if k != 'loss' and 'loss' in k and not np.isfinite(np.asarray(metrics[k])[i])
  ]
  return i, (culprits[0] if culprits else 'loss')


def summary_line(rec: dict) -> str:
  def num(key, fmt):
    v = rec.get(key)
    return 'n/a' if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

  key = 'test_mse' if 'test_mse' in rec else 'test_accuracy'
  return (
    f'final: {key}={num(key, ".4f")} (parameters of epoch '
    f'{rec["best_epoch"]}, val_loss={num("best_val_loss", ".4f")}); '
    f'{rec["epoch"]} epochs, {rec["step"]} steps, {num("samples_per_second", ".0f")} samples/s'
  )


# -- a run --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """Everything a run is built from; `state`, `best` and `meta` change as it trains."""

  config: ml_collections.FrozenConfigDict
  workdir: str
  data: data_lib.Dataset
  para: DataParallel
  learner: step_lib.Learner
  log: MetricsLog
  ckpt: checkpoint.Checkpointer
  state: TrainState
  best: dict
  meta: dict
  steps_per_epoch: int
  data_rng: jax.Array
  data_state: dict | None = None  # the streaming pipeline's state after the last trained batch

  @property
  def config_json(self) -> dict:
    return checkpoint.config_to_json(self.config)

  def save(self, state: TrainState, meta: dict) -> None:
    self.ckpt.save(
      int(state.step),
      {'state': state, 'best': self.best},
      {**meta, 'config': self.config_json},
      self.data_state,
    )


def build(config: ml_collections.FrozenConfigDict, workdir: str) -> Run:
  """Data, devices, the rule with its optimizers, and the initial state."""
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  data = (stream_lib.load if config.pipeline == 'stream' else data_lib.load)(config)
  para = DataParallel(config.parallel)
  para.check_batch(config.batch_size)
  steps_per_epoch = len(data.train) // config.batch_size
  task = Task(
    data.num_classes,
    data.image_shape,
    steps_per_epoch * config.num_epochs,
    models.task_kind(config.model),
  )
  learner = step_lib.build(config, task, para.batch_axis)
  init_rng, data_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  images, labels = data.train.head(config.batch_size // para.n)
  # Compiled as one program (bitwise the eager values): eagerly, every op compiles on its own.
  init = jax.jit(learner.init)
  state = init(init_rng, {'image': jnp.asarray(images), 'label': jnp.asarray(labels)})
  best = jax.device_get({'params': state.params, 'extra': state.extra})  # host copy
  return Run(
    config,
    workdir,
    data,
    para,
    learner,
    MetricsLog(workdir, is_main),
    checkpoint.Checkpointer(workdir, config.keep_checkpoints),
    state,
    best,
    {'epoch': 0, 'best_epoch': 0, 'best_val_loss': float('inf')},
    steps_per_epoch,
    data_rng,
  )


def _finished(run: Run) -> dict | None:
  final = [r for r in run.log.records() if r.get('final')]
  done = int(run.state.step) >= run.learner.rule.task.total_steps
  return final[-1] if done and final and final[-1].get('epoch') == run.config.num_epochs else None


def move_aside(workdir: str, why: str) -> None:
  """Moves a previous run's files into `workdir/previous-<time>/` (nothing is deleted)."""
  names = [
    n
    for n in ('checkpoints', 'metrics.jsonl', 'config.json', 'plots', snapshots.FOLDER)
    if os.path.exists(os.path.join(workdir, n))
  ]
  if not names or jax.process_index() != 0:
    return
  aside = os.path.join(workdir, f'previous-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(aside)
  for name in names:
    shutil.move(os.path.join(workdir, name), aside)
  print(f'force_retrain: {why}; moved it to {aside}')


def resume(run: Run) -> dict | None:
  """Restores the newest good checkpoint into `run` (or starts fresh); returns the final record
  instead when the workdir holds this run finished."""
  c = run.config
  saved = _saved_config(run.workdir)
  if c.force_retrain and run.ckpt.steps():
    finished = any(r.get('final') for r in run.log.records())
    changed = saved is None or config_lib.changed_keys(saved, run.config_json)
    if finished or changed:
      move_aside(
        run.workdir,
        'the previous run is finished'
        if finished
        else f'the previous run was made by another config ({", ".join(changed or ["?"])})',
      )
      run.ckpt = checkpoint.Checkpointer(run.workdir, c.keep_checkpoints)
      saved = None
    else:
      print('force_retrain: the previous run is unfinished and made by this config: resuming it')
  if saved is not None:
    config_lib.check_schedule(saved, run.config_json)
  restored = run.ckpt.restore(
    {'state': run.state, 'best': run.best}, run.config_json, with_data=True
  )
  if restored is None:
    run.log.truncate_after(0)  # records of a run killed before its first checkpoint
  else:
    tree, meta, run.data_state = restored
    run.state, run.best, run.meta = tree['state'], tree['best'], meta
    final = _finished(run)
    if final is not None:
      print(
        f'{run.workdir} already holds a finished run; raise --config.num_epochs to train '
        'further, or set --config.force_retrain=True to redo it'
      )
      print(summary_line(final))
      return final
    run.log.truncate_after(int(run.state.step))
    print(
      f'resumed from {run.ckpt.directory} at step {int(run.state.step)} (epoch {meta["epoch"]})'
    )
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
      json.dump(run.config_json, f, indent=2)
  return None


def _saved_config(workdir: str) -> dict | None:
  """The config.json of the run already in `workdir`, if any."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def train_epoch(run: Run, epoch: int, fns: dict, feed) -> tuple[dict, float]:
  """Trains to the end of `epoch` from `run.state`; returns (per-step metric means, samples/s).

  `feed` (`MemoryFeed` or `stream.TrainFeed`) gives each call's batches; the next call's are
  placed on the devices while the current one computes."""
  c, para = run.config, run.para
  step = int(para.get_state(run.state).step)
  offset = step - epoch * run.steps_per_epoch
  per_call = c.steps_per_call or run.steps_per_epoch
  if c.checkpoint_every_steps:
    per_call = min(per_call, c.checkpoint_every_steps)

  def size(step: int, offset: int) -> int:  # steps of the call that starts there
    n = min(per_call, run.steps_per_epoch - offset)
    snap = fns['snapshots'].next_after(step)  # a call ends at every requested snapshot step
    return n if snap is None else min(n, snap - step)

  n = size(step, offset)
  batches = (n, *feed.take(epoch, offset, n)) if offset < run.steps_per_epoch else None
  bar = _progress(c, epoch, run.steps_per_epoch, offset)
  partial = run.meta.pop('partial_epoch', None) or {'sums': {}, 'count': 0}
  sums, count = dict(partial['sums']), partial['count']  # running sums of every step metric
  train_time, steps_run, last_saved = 0.0, 0, step
  while offset < run.steps_per_epoch:
    n, args, data_state = batches
    compiled = fns['compiled']
    if n not in compiled:  # compile ahead of time, so it is not counted as training time
      t0 = time.perf_counter()
      compiled[n] = para.ahead_of_time(fns['chunk'], run.state, *args)
      print(f'compiled a {n}-step call in {time.perf_counter() - t0:.1f}s', flush=True)
    t0 = time.perf_counter()
    run.state, metrics = compiled[n](run.state, *args)
    if offset + n < run.steps_per_epoch:  # the next call's batches, while this one computes
      m = size(step + n, offset + n)
      batches = (m, *feed.take(epoch, offset + n, m))
    metrics = para.get_metrics(metrics)  # one host sync per call
    run.data_state = data_state
    elapsed = time.perf_counter() - t0
    train_time += elapsed
    _stop_if_nonfinite(run, metrics, step, epoch)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
    count, steps_run, step, offset = count + n, steps_run + n, step + n, offset + n
    fns['snapshots'].maybe_save(para.get_state(run.state), step)
    if (
      c.checkpoint_every_steps
      and offset < run.steps_per_epoch
      and step - last_saved >= c.checkpoint_every_steps
    ):
      run.save(
        para.get_state(run.state), {**run.meta, 'partial_epoch': {'sums': sums, 'count': count}}
      )
      last_saved = step
    if bar is not None:
      bar.update(n)
      bar.set_postfix(
        loss=f'{float(np.mean(metrics["loss"])):.4f}',
        samples_s=f'{n * c.batch_size / max(elapsed, 1e-9):.0f}',
      )
  if bar is not None:
    bar.close()
  return {k: v / count for k, v in sums.items()}, steps_run * c.batch_size / max(train_time, 1e-9)


def _stop_if_nonfinite(run: Run, metrics: dict, step: int, epoch: int) -> None:
  bad = _first_nonfinite(metrics)
  if bad is None:
    return
  steps = run.ckpt.steps()
  where = (
    f'resume from its step {steps[-1]} with a lower lr: rerun with e.g. '
    f'--config.optimizer.forward.lr=<lower> --config.resume_override=optimizer.forward.lr'
    if steps
    else 'no checkpoint yet: rerun with a lower learning rate'
  )
  raise UserError(
    f'non-finite loss at step {step + bad[0] + 1} (epoch {epoch + 1}, rule '
    f'{run.config.rule}), first in {bad[1]}; the last good checkpoint is kept in '
    f'{run.ckpt.directory}; {where}'
  )


def evaluate_epoch(run: Run, epoch: int, train_means: dict, sps: float, fns: dict) -> dict:
  """The epoch's record: train means, validation and test loss/accuracy, alignment metrics;
  keeps the best-by-validation parameters."""
  c = run.config
  state = run.para.get_state(run.state)
  val = evaluate_split(fns['eval'], state.params, state.extra, run.data.val, c.eval_batch_size)
  test = evaluate_split(fns['eval'], state.params, state.extra, run.data.test, c.eval_batch_size)
  record = {
    'step': int(state.step),
    'epoch': epoch + 1,
    'train_loss': train_means['loss'],
    **{f'val_{k}': v for k, v in val.items()},  # loss and accuracy (classification) or mse
    **{f'test_{k}': v for k, v in test.items()},
    'samples_per_second': sps,
  }
  record.update({f'train_{k}': v for k, v in train_means.items() if k != 'loss'})
  record.update({k: float(np.asarray(v)) for k, v in fns['analyze'](state, fns['batch']).items()})
  if not len(run.data.val) or val['loss'] < run.meta['best_val_loss']:
    run.best = jax.device_get({'params': state.params, 'extra': state.extra})
    run.meta = {**run.meta, 'best_epoch': epoch + 1, 'best_val_loss': val['loss']}
  run.meta = {**run.meta, 'epoch': epoch + 1}
  run.log.add(record)
  metric = fns['eval'].metric
  short = {'accuracy': 'acc'}.get(metric, metric)
  print(
    f'epoch {epoch + 1}/{c.num_epochs}: train_loss {record["train_loss"]:.4f} '
    f'val_loss {val["loss"]:.4f} val_{short} {val[metric]:.4f} '
    f'test_{short} {test[metric]:.4f} ({sps:.0f} samples/s)',
    flush=True,
  )
  if (epoch + 1) % c.checkpoint_every_epochs == 0 or epoch + 1 == c.num_epochs:
    run.save(state, run.meta)
  return record


def finish(run: Run, sps: float, evaluate) -> dict:
  """The final record: test accuracy of the best-by-validation parameters; plots."""
  c = run.config
  test = evaluate_split(
    evaluate, run.best['params'], run.best['extra'], run.data.test, c.eval_batch_size
  )
  final = {
    'step': int(run.para.get_state(run.state).step),
    'epoch': c.num_epochs,
    'final': True,
    **{f'test_{k}': v for k, v in test.items() if k != 'loss'},
    'test_loss': test['loss'],
    'best_epoch': run.meta['best_epoch'],
    'best_val_loss': run.meta['best_val_loss'],
    'samples_per_second': sps,
  }
  run.log.add(final)
  if jax.process_index() == 0:
    from ccl_jax import report

    print(f'plots: {report.plot_run(run.workdir, f"{c.rule} · {c.model} · {c.dataset}")}')
  print(summary_line(final), flush=True)
  return final


# -- the loop -----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.rule` on `config.dataset`, evaluating and checkpointing each epoch.

  Resumes from `workdir/checkpoints` when present; a finished run prints its results instead.
  Returns the final record (test accuracy of the parameters with the lowest validation loss).
  """
  config = config_lib.finalize(config)  # validated and frozen before anything is traced
  run = build(config, workdir)
  done = resume(run)
  if done is not None:
    return done
  rule, para, data = run.learner.rule, run.para, run.data
  analysis = data.val if len(data.val) else data.train
  images, labels = analysis.head(config.analysis_batch_size if len(data.val) else 256)
  fns = {
    'compiled': {},
    'eval': make_eval(rule, config.loss),
    'analyze': jax.jit(rule.analyze),
    'batch': {'image': jnp.asarray(images), 'label': jnp.asarray(labels)},
  }
  if config.pipeline == 'stream':
    feed = stream_lib.TrainFeed(config, data.train, run.steps_per_epoch, para)
    fns['chunk'] = para.compile_stream(make_stream_chunk(run.learner.update, config.scan_unroll))
  else:
    feed = MemoryFeed(run, (para.put_data(data.train.images), para.put_data(data.train.labels)))
    augment = data_lib.augmenter(config)
    fns['chunk'] = para.compile(make_chunk(run.learner.update, config.scan_unroll, augment))
  run.state = para.put_state(run.state)
  step = int(para.get_state(run.state).step)
  fns['snapshots'] = snapshots.Snapshots(
    workdir,
    config.snapshot_steps,
    rule,
    data_lib.Split(*data.test.head(snapshots.N_IMAGES)),  # (a streamed split has no arrays)
    jax.process_index() == 0,
  )
  fns['snapshots'].truncate_after(step)
  fns['snapshots'].maybe_save(para.get_state(run.state), step)  # step 0: before training
  if config.pipeline == 'stream':
    feed.start(step, run.data_state)
  sps = float('nan')
  try:
    for epoch in range(step // run.steps_per_epoch, config.num_epochs):
      means, sps = train_epoch(run, epoch, fns, feed)
      evaluate_epoch(run, epoch, means, sps, fns)
  finally:
    feed.close()
  return finish(run, sps, fns['eval'])


def _progress(config, epoch: int, total: int, done: int):
  if not config.progress or not sys.stderr.isatty():
    return None  # the per-epoch line is the progress report in logs
  from tqdm import tqdm

  return tqdm(
    total=total,
    initial=done,
    desc=f'epoch {epoch + 1}/{config.num_epochs}',
    unit='step',
    leave=False,
    mininterval=1.0,
    dynamic_ncols=True,
  )
