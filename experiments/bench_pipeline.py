"""Is the streaming pipeline ever the bottleneck? Its images/s alone against the training step's.

Pipeline: the CIFAR-10 training set read from the tfds array_record files (`--data_dir`) through
the real streamed pipeline (`stream.load` + `stream.train_dataset`: read, PNG/JPEG decode,
normalise, pad-crop 4 + flip), in this one process with no reader threads, so the rate is per CPU
core; the same without augmentation; and with `--threads` reader threads (all cores).
Step: the ResNet-20 BP training step (`configs/cifar10_resnet20_bp.py`, the fused chunk the loop
compiles for streamed batches, `train.make_stream_chunk`) on batches already on the device.

  python experiments/bench_pipeline.py --data_dir ../shared/data/tfds            # defaults
  python experiments/bench_pipeline.py --batches 8 --steps 4 --repeats 2          # quick
Writes <out>.md (default experiments/results/bench_pipeline.md) and <out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax import config as config_lib
from ccl_jax import step, stream, train
from ccl_jax.rules.base import Task

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, **overrides):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def pipeline_rate(config, batches: int, augment: bool, threads: int) -> float:
  """Images/s of `batches` training batches through the streamed pipeline."""
  import grain

  data = stream.load(config)
  split = data.train
  if not augment:
    split = dataclasses.replace(
      split, decode=dataclasses.replace(split.decode, crop_pad=0, flip=False)
    )
  steps = len(split) // config.batch_size
  ds = stream.train_dataset(split, config.batch_size, steps, 1, config.seed, True)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 1) * 2)
  it = iter(ds.to_iter_dataset(options))
  next(it)  # open the files, warm the readers
  t0 = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += len(next(it)['label'])
  return n / (time.perf_counter() - t0)


def step_rate(config, steps: int, repeats: int) -> tuple[float, float]:
  """(images/s, compile seconds) of the ResNet-20 training step on device-resident batches."""
  b = config.batch_size
  task = Task(10, (32, 32, 3), total_steps=1000)
  learner = step.build(config, task)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(steps, b, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, (steps, b)).astype(np.int32))
  state = learner.init(jax.random.PRNGKey(0), {'image': images[0], 'label': labels[0]})
  chunk = jax.jit(train.make_stream_chunk(learner.update, config.scan_unroll), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = chunk.lower(state, images, labels).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, images, labels)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = compiled(state, images, labels)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return steps * b / statistics.median(times), compile_s


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--data_dir', default=str(ROOT.parent / 'shared' / 'data' / 'tfds'))
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--batches', type=int, default=20, help='pipeline batches timed')
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  p.add_argument('--steps', type=int, default=8, help='steps per timed call (the config: 8)')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--out', default=str(ROOT / 'experiments' / 'results' / 'bench_pipeline'))
  args = p.parse_args()
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  config = config_lib.finalize(
    load_config(
      'cifar10_resnet20_bp',
      pipeline='stream',
      data_dir=args.data_dir,
      batch_size=args.batch_size,
      steps_per_call=args.steps,
    )
  )
  rows = {}
  rows['pipeline_decode'] = pipeline_rate(config, args.batches, augment=False, threads=0)
  rows['pipeline_decode_augment'] = pipeline_rate(config, args.batches, augment=True, threads=0)
  rows['pipeline_threads'] = pipeline_rate(config, args.batches, True, threads=args.threads)
  rows['step'], rows['compile_s'] = step_rate(config, args.steps, args.repeats)
  cores = os.cpu_count() or 1
  need = rows['step'] / rows['pipeline_decode_augment']
  info = {
    **rows,
    'cores': cores,
    'threads': args.threads,
    'batch_size': args.batch_size,
    'batches': args.batches,
    'steps': args.steps,
    'device': str(jax.devices()[0].device_kind),
    'cores_needed': need,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix('.json').write_text(json.dumps(info, indent=2) + '\n')
  table = [
    '# Streaming pipeline vs the ResNet-20 training step, CIFAR-10',
    '',
    f'`python experiments/bench_pipeline.py --batches {args.batches} --steps {args.steps} '
    f'--repeats {args.repeats} --threads {args.threads}`; batch {args.batch_size}; '
    f'{cores} CPU cores ({info["device"]}), shared with other jobs while measured.',
    '',
    '| what | images/s |',
    '|---|---:|',
    f'| pipeline, read + decode + normalise, 1 core | {rows["pipeline_decode"]:.0f} |',
    f'| pipeline, + pad-crop 4 + flip (the CIFAR training map), 1 core '
    f'| {rows["pipeline_decode_augment"]:.0f} |',
    f'| pipeline, same, {args.threads} reader threads | {rows["pipeline_threads"]:.0f} |',
    f'| ResNet-20 BP training step ({args.steps}-step fused call, all cores) '
    f'| {rows["step"]:.0f} |',
    '',
    f'The step consumes {rows["step"]:.0f} images/s; one core of the pipeline makes '
    f'{rows["pipeline_decode_augment"]:.0f}: {need:.2f} cores (`data.workers` processes or '
    f'`data.threads` threads) keep it fed here. Step compile: {rows["compile_s"]:.1f} s.',
    '',
  ]
  out.with_suffix('.md').write_text('\n'.join(table))
  print('\n'.join(table))


if __name__ == '__main__':
  sys.exit(main())
