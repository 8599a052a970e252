"""The config every run starts from, and the machinery that lets each module own its settings.

A config has a few top-level keys every run has (`SETTINGS` below), the two optimizer blocks, and
one section per rule, model and the data pipeline, each declared, documented and validated by the
module that uses it (`rules/*.py`, `models/*.py`, `data.py` export a `SETTINGS` dict of
`Setting`s; the registries say which section belongs to which name). `base()` holds every
section, so `--config.<section>.<key>=value` works whatever rule or model a run picks;
`finalize()` validates and keeps only the sections the run uses. This module names no rule,
model or dataset.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import ml_collections

from ccl_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Setting:
  """One config key: its default, a one-line doc, and what values it accepts."""

  default: Any
  doc: str
  choices: tuple | None = None
  check: Callable[[Any], bool] | None = None
  must: str = ''  # what `check` demands, for the error message ('>= 0')


def positive(doc: str, default: Any) -> Setting:
  return Setting(default, doc, check=lambda v: v > 0, must='> 0')


def non_negative(doc: str, default: Any) -> Setting:
  return Setting(default, doc, check=lambda v: v >= 0, must='>= 0')


def fraction(doc: str, default: float, closed: bool = False) -> Setting:
  if closed:
    return Setting(default, doc, check=lambda v: 0 <= v <= 1, must='in [0, 1]')
  return Setting(default, doc, check=lambda v: 0 <= v < 1, must='in [0, 1)')


def widths(doc: str, default: tuple[int, ...]) -> Setting:
  return Setting(
    default,
    doc,
    check=lambda v: len(v) > 0 and all(int(w) > 0 for w in v),
    must='a non-empty list of positive widths',
  )


def section(settings: dict[str, Setting]) -> ml_collections.ConfigDict:
  """A ConfigDict of the settings' defaults."""
  return ml_collections.ConfigDict({k: s.default for k, s in settings.items()})


def check(prefix: str, values, settings: dict[str, Setting]) -> None:
  """Raises UserError naming the first value of `values` its `Setting` refuses."""
  for key, s in settings.items():
    v = values[key]
    if s.choices is not None and v not in s.choices:
      raise UserError(f'config.{prefix}{key}={v!r} is not one of {", ".join(map(str, s.choices))}')
    try:
      ok = s.check is None or bool(s.check(v))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise UserError(f'config.{prefix}{key}={v!r} must be {s.must}')


# -- the keys every run has ---------------------------------------------------------------------
SETTINGS = {
  'rule': Setting('', 'learning rule (see `rules.REGISTRY`); its settings: config.<rule>.*'),
  'model': Setting('', 'network (see `models.REGISTRY`); its settings: config.<model>.*'),
  'dataset': Setting('digits', "dataset: 'digits' (built in) or a prepared tfds dataset"),
  'data_dir': Setting('', "tfds data_dir; '' = $CCL_JAX_DATA_DIR or ~/tensorflow_datasets"),
  'train_subset': non_negative('use only the first N training examples; 0 = all', 0),
  'pipeline': Setting(
    'memory',
    "input pipeline: 'memory' (each split decoded whole, batches drawn on the device) or "
    "'stream' (Grain reads, decodes and augments batch by batch; resumes exactly; `stream.py`)",
    choices=('memory', 'stream'),
  ),
  'loss': Setting(
    'ce',
    "task loss: 'ce' (softmax cross-entropy) or 'bce' (summed binary CE on sigmoid outputs)",
    choices=('ce', 'bce'),
  ),
  'batch_size': positive('global batch size (split over devices)', 64),
  'num_epochs': positive('training epochs', 20),
  'seed': Setting(
    2023,
    'seed of the init, the data order and every random stream',
    check=lambda v: 0 <= int(v) < 2**32,
    must='in [0, 2**32)',
  ),
  'parallel': Setting(
    'none', 'data parallelism over all devices', choices=('none', 'pmap', 'shard_map')
  ),
  'steps_per_call': non_negative('training steps fused into one compiled call; 0 = an epoch', 0),
  'scan_unroll': non_negative(
    'lax.scan unroll of those steps; 0 = inline them all (conv nets on CPU)', 1
  ),
  'compute_dtype': Setting(
    'float32',
    "'bfloat16': bf16 matmuls, float32 parameters (rules that support it, on accelerators)",
    choices=('float32', 'bfloat16'),
  ),
  'conv_impl': Setting(
    'auto',
    "how convs and max-pools are computed: 'im2col' (patches × matrix, one large matmul each; "
    "reshape max-pools), 'winograd' (im2col, with the 3×3 stride-1 convs of 32+ channels by "
    "Winograd F(2×2, 3×3): 2.25× fewer multiply-adds), 'xla' (lax.conv, reduce_window) or "
    "'auto' (winograd on CPU, where it is 2-5x faster than xla; xla elsewhere); "
    '`layers.resolve_conv_impl`',
    choices=('auto', 'xla', 'im2col', 'winograd'),
  ),
  'eval_batch_size': positive('batch size of evaluation', 1000),
  'analysis_batch_size': positive('batch of the alignment metrics at each evaluation', 256),
  'checkpoint_every_epochs': positive('checkpoint every N epochs (and at the end)', 1),
  'checkpoint_every_steps': non_negative('also checkpoint mid-epoch every N steps; 0 = off', 0),
  'keep_checkpoints': positive('newest checkpoints kept', 2),
  'force_retrain': Setting(
    False,
    'start over in a workdir whose run is finished or was made by '
    'another config (its files are moved aside)',
  ),
  'resume_override': Setting(
    '',
    'comma-separated keys allowed to differ from the checkpoint '
    "being resumed: 'num_epochs' and optimizer.<tree>.<lr|schedule|"
    "...>, e.g. 'optimizer.forward.lr'",
  ),
  'progress': Setting(True, 'progress bar on a terminal'),
  'snapshot_steps': Setting(
    (),
    'global steps (0 = before training) at which to save features of 500 test images for the '
    't-SNE figure, to WORKDIR/snapshots/ (`snapshots.py`); () = none',
    check=lambda v: all(int(s) == s and s >= 0 for s in v),
    must='a list of steps >= 0',
  ),
}


def registries() -> tuple[dict, dict, dict]:
  """{section name: settings} of the rules, the models and the data pipeline, and which section
  each rule and model name uses."""
  from ccl_jax import data, models, optim, rules  # late imports: they import this module

  sections, owner = {}, {}
  for kind, registry in (('rule', rules.REGISTRY), ('model', models.REGISTRY)):
    for name, module in registry.items():
      if getattr(module, 'SETTINGS', None):
        sec = getattr(module, 'SECTION', name)
        sections[sec] = module.SETTINGS
        owner[(kind, name)] = sec
  sections['data'] = data.SETTINGS
  return sections, owner, optim.SETTINGS


def base() -> ml_collections.ConfigDict:
  """Defaults of every key and every section; an experiment config sets rule and model."""
  sections, _, opt = registries()
  c = section(SETTINGS)
  for name, settings in sections.items():
    c[name] = section(settings)
  c.optimizer = ml_collections.ConfigDict({t: section(opt) for t in ('forward', 'feedback')})
  return c


def used_sections(c) -> tuple[str, ...]:
  """The sections a run of `c` reads: its rule's, its model's, and 'data'."""
  _, owner, _ = registries()
  found = [owner.get(('rule', c.rule)), owner.get(('model', c.model)), 'data']
  return tuple(s for s in found if s)


def validate(c) -> None:
  """Raises UserError naming the first bad value, of any key or section the run uses."""
  from ccl_jax import data, models, rules

  if c.rule not in rules.REGISTRY:
    raise UserError(f"unknown rule '{c.rule}'; choose one of {', '.join(rules.REGISTRY)}")
  if c.model not in models.REGISTRY:
    raise UserError(f"unknown model '{c.model}'; choose one of {', '.join(models.REGISTRY)}")
  if c.dataset not in data.DATASETS:
    raise UserError(f"unknown dataset '{c.dataset}'; choose one of {', '.join(data.DATASETS)}")
  sections, _, opt = registries()
  check('', c, SETTINGS)
  resume_overrides(c)
  for name in used_sections(c):
    check(f'{name}.', c[name], sections[name])
  for tree in ('forward', 'feedback'):
    check(f'optimizer.{tree}.', c.optimizer[tree], opt)
  rule = rules.REGISTRY[c.rule]
  if c.compute_dtype != 'float32' and not getattr(rule, 'MIXED_PRECISION', False):
    raise UserError(
      f"config.compute_dtype='{c.compute_dtype}' is not supported by rule "
      f"'{c.rule}' (its layers compute in float32)"
    )
  for module in (rule, models.REGISTRY[c.model]):  # checks across sections
    if hasattr(module, 'check'):
      module.check(c)


def finalize(c) -> ml_collections.FrozenConfigDict:
  """Validates `c` and freezes it with only the sections the run uses (before anything traces)."""
  validate(c)
  sections, _, _ = registries()
  keep = set(used_sections(c))
  out = ml_collections.ConfigDict(c.to_dict())
  for name in sections:
    if name not in keep and name in out:
      del out[name]
  return ml_collections.FrozenConfigDict(out)


def describe() -> str:
  """Every key and section with its default and one-line doc (for `main --help`)."""
  sections, owner, opt = registries()
  users = {}
  for (kind, name), sec in owner.items():
    users.setdefault(sec, []).append(f'{kind} {name}')
  lines = ['Config keys (override with --config.<key>=value):']
  lines += [f'  {k} = {s.default!r}  -- {s.doc}' for k, s in SETTINGS.items()]
  lines += ['  optimizer.{forward,feedback}.<key>:']
  lines += [f'    {k} = {s.default!r}  -- {s.doc}' for k, s in opt.items()]
  for name, settings in sections.items():
    lines.append(f'  {name}.<key>  ({", ".join(users.get(name, ["every run"]))}):')
    lines += [f'    {k} = {s.default!r}  -- {s.doc}' for k, s in settings.items()]
  return '\n'.join(lines)


# -- comparing a saved run's config with this one ------------------------------------------------
# Keys that steer how a run executes, not what it computes: they may change between resumes.
RUN_CONTROL_KEYS = frozenset(
  {
    'num_epochs',
    'data_dir',
    'progress',
    'parallel',
    'force_retrain',
    'resume_override',
    'checkpoint_every_epochs',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'steps_per_call',
    'scan_unroll',
    'conv_impl',
    'eval_batch_size',
    'analysis_batch_size',
    'snapshot_steps',
    'data.cache_dir',
    'data.workers',
    'data.threads',
    'data.prefetch',
  }
)
# What `resume_override` may name: the learning rate and its schedule, never a shape.
OVERRIDABLE = ('lr', 'schedule', 'min_lr', 'warmup_steps', 'milestones', 'decay_factor')
# Keys of configs written before each module owned its section: old name -> new name.
MOVED = {
  'hidden': 'mlp.hidden',
  'channels': 'cnn.channels',
  'activation': '<model>.activation',
  'output_activation': '<model>.output_activation',
  'init': '<model>.init',
  'use_bias': '<model>.use_bias',
  'normalize': 'data.normalize',
  'cache_dir': 'data.cache_dir',
  'augment_pad': 'data.crop_pad',
  'augment_flip': 'data.flip',
  'augment_padding': 'data.pad_mode',
  'val_fraction': 'data.val_fraction',
  'shuffle': 'data.shuffle',
  'loss_scale_c': 'ccl.loss_scale',
  'ccl_self_scale': 'ccl.self_scale',
  'loss_warmup_steps': 'ccl.loss_warmup_steps',
  'ccl_filter_target': 'ccl.filter_target',
  'sign_scale': 'sign_symmetry.scale',
  'kp_decay': 'kp.decay',
  'wm_lr': 'wm.lr',
  'wm_noise': 'wm.noise',
  'wm_batch': 'wm.batch',
  'wm_decay': 'wm.decay',
  'wm_init_steps': 'wm.init_steps',
  'dropout': 'local.dropout',
  'bio': 'local.bio',
  'bio_code_size': 'local.code_size',
  'local_beta': 'local.beta',
  'dim_in_decoder': 'local.dim_in_decoder',
  'feat_mult': 'vgg.feat_mult',
}


def resume_overrides(c) -> tuple[str, ...]:
  """The keys `config.resume_override` ('a,b') allows to differ from a resumed checkpoint."""
  keys = tuple(k.strip() for k in str(c.get('resume_override', '') or '').split(',') if k.strip())
  for key in keys:
    parts = key.split('.')
    if key != 'num_epochs' and not (
      len(parts) == 3
      and parts[0] == 'optimizer'
      and parts[1] in ('forward', 'feedback')
      and parts[2] in OVERRIDABLE
    ):
      raise UserError(
        f"config.resume_override names '{key}': only num_epochs and "
        f'optimizer.<forward|feedback>.<{"|".join(OVERRIDABLE)}> may change on '
        'resume (a shape never)'
      )
  return keys


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def changed_keys(saved: dict, now: dict) -> list[str]:
  """Dotted config keys whose values differ, ignoring run-control keys and those `now`'s
  `resume_override` allows. A key the saved config lacks (added to the package since) counts as
  unchanged while it holds its default. A config of the old flat layout is refused in one line."""
  moved = sorted(k for k in saved if k in MOVED and k not in now)
  if moved:
    raise UserError(
      'this checkpoint was written before the config redesign and cannot resume '
      'here (moved keys: '
      + ', '.join(f'{k} -> {MOVED[k]}' for k in moved[:6])
      + (', ...' if len(moved) > 6 else '')
      + '); start it in a new --workdir'
    )
  allowed = set(resume_overrides(ml_collections.ConfigDict(now)))
  a, b = _flat(saved), _flat(now)
  defaults = _flat(json.loads(base().to_json_best_effort()))  # as saved: lists, not tuples
  missing = lambda k: k not in a and k in defaults and b.get(k) == defaults[k]
  skip = lambda k: k in RUN_CONTROL_KEYS or k.split('.')[0] in RUN_CONTROL_KEYS or k in allowed
  return sorted(
    k for k in set(a) | set(b) if not skip(k) and a.get(k) != b.get(k) and not missing(k)
  )


def check_schedule(saved: dict, now: dict) -> None:
  """Refuses a resume whose new `num_epochs` would silently move a schedule's decay points."""
  if saved.get('num_epochs') in (None, now.get('num_epochs')):
    return
  if 'num_epochs' in resume_overrides(ml_collections.ConfigDict(now)):
    return
  moving = [
    t
    for t in ('forward', 'feedback')
    if now.get('optimizer', {}).get(t, {}).get('schedule') in ('cosine', 'step')
  ]
  if moving:
    raise UserError(
      f'num_epochs {saved["num_epochs"]} -> {now["num_epochs"]} would move the '
      f'{now["optimizer"][moving[0]]["schedule"]} schedule of optimizer.{moving[0]} (its '
      f"decay follows the run's length); rerun with --config.num_epochs={saved['num_epochs']} "
      'to finish as planned, or add --config.resume_override=num_epochs to continue on the '
      'schedule of the new length'
    )
