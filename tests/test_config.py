"""Configs: every module owns a validated section; experiment configs are distinct and valid;
a saved run's config is compared key by key (moved keys, lr overrides, schedule changes)."""

import json

import pytest

from ccl_jax import config as config_lib
from ccl_jax import models, rules
from ccl_jax.errors import UserError

from conftest import ROOT, load_config

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py'))


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_validates_and_names_its_paper(name):
  c = load_config(name)
  frozen = config_lib.finalize(c)
  doc = (ROOT / 'configs' / f'{name}.py').read_text().split('"""')[1]
  assert doc and '\n' not in doc.strip(), name  # a one-line docstring
  # Only the sections this run reads survive finalize: its rule's, its model's and 'data'.
  sections, _, _ = config_lib.registries()
  kept = {k for k in frozen.keys() if k in sections}
  assert kept == set(config_lib.used_sections(c)), (name, kept)


def test_no_two_configs_are_identical():
  seen = {}
  for name in CONFIGS:
    text = json.dumps(load_config(name).to_dict(), sort_keys=True, default=str)
    assert text not in seen, (name, seen.get(text))
    seen[text] = name


def test_the_config_module_names_no_rule_or_model():
  source = (ROOT / 'ccl_jax' / 'config.py').read_text()
  for name in set(rules.REGISTRY) | set(models.REGISTRY):
    assert f"'{name}'" not in source, name


def test_every_section_is_the_owners_settings_with_docs():
  base = config_lib.base()
  sections, owner, _ = config_lib.registries()
  for (kind, name), section in owner.items():
    assert section in base, (kind, name)
  for section, settings in sections.items():
    assert set(base[section].keys()) == set(settings)
    assert all(s.doc for s in settings.values()), section


@pytest.mark.parametrize(
  'key,value,needle',
  [
    ('kp.decay', 1.5, 'config.kp.decay=1.5 must be in (0, 1]'),
    ('wm.init_steps', -3, 'config.wm.init_steps=-3'),
    ('mlp.hidden', (), 'config.mlp.hidden=()'),
    ('data.pad_mode', 'reflect', "config.data.pad_mode='reflect'"),
    ('optimizer.feedback.schedule', 'linear', 'config.optimizer.feedback.schedule'),
    ('seed', -1, 'config.seed=-1'),
    ('resume_override', 'mlp.hidden', "config.resume_override names 'mlp.hidden'"),
  ],
)
def test_a_bad_value_is_named_in_one_line(key, value, needle):
  c = load_config('default', rule='kp' if key.startswith('kp') else 'wm' if 'wm' in key else 'ccl')
  node, *path = [c] + key.split('.')
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = value
  with pytest.raises(
    UserError,
    match='^'
    + needle.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[').replace(']', r'\]'),
  ):
    config_lib.validate(c)


def test_a_config_of_the_old_flat_layout_is_refused_naming_the_moved_keys():
  now = json.loads(config_lib.finalize(load_config('default')).to_json_best_effort())
  old = {k: v for k, v in now.items() if k not in ('mlp', 'ccl')}
  old.update(hidden=[256, 256], loss_scale_c=0.5, activation='elu')
  with pytest.raises(
    UserError,
    match=r'moved keys: activation -> <model>.activation, hidden -> '
    r'mlp.hidden, loss_scale_c -> ccl.loss_scale',
  ):
    config_lib.changed_keys(old, now)


def test_resume_override_allows_a_changed_lr_and_nothing_else():
  saved = json.loads(config_lib.finalize(load_config('default')).to_json_best_effort())
  now = json.loads(json.dumps(saved))
  now['optimizer']['forward']['lr'] = 0.1
  assert config_lib.changed_keys(saved, now) == ['optimizer.forward.lr']
  now['resume_override'] = 'optimizer.forward.lr'
  assert config_lib.changed_keys(saved, now) == []
  now['mlp']['hidden'] = [8]
  assert config_lib.changed_keys(saved, now) == ['mlp.hidden']


def test_raising_num_epochs_under_a_decaying_schedule_is_refused_unless_asked_for():
  saved = json.loads(config_lib.finalize(load_config('digits_predsim')).to_json_best_effort())
  now = {**saved, 'num_epochs': 20}
  with pytest.raises(UserError, match='num_epochs 10 -> 20 would move the step schedule'):
    config_lib.check_schedule(saved, now)
  config_lib.check_schedule(saved, {**now, 'resume_override': 'num_epochs'})
  constant = json.loads(config_lib.finalize(load_config('default')).to_json_best_effort())
  config_lib.check_schedule(constant, {**constant, 'num_epochs': 40})  # nothing moves
