#!/usr/bin/env bash
# GPU speed check (issue 17), one call on a machine with a CUDA GPU and this repo, ~5-8 minutes:
#   - CIFAR-10 cnn_pool BP and CCL at batch 128: step and whole-epoch time, fp32 and bf16, and the
#     fraction of the GPU's measured matmul roof in the same dtype (targets: CCL epoch < 5 s on an
#     H100/H200, >= 40 % of the bf16 roof); CCL with conv_impl=im2col too (is 'auto' = lax.conv
#     right on GPUs?); FA and KP on the same net;
#   - the CIFAR-10 MLP (3072-1024x3-10, batch 256) under every rule, each step time over BP's.
# Writes experiments/results/bench_gpu.md (and bench_gpu_{cnn,mlp}.jsonl/.md beside it).
#
#   experiments/gpu_check.sh                     # on the GPU machine
#   experiments/gpu_check.sh --platform cpu --dry   # tiny dry run of the same flow on a CPU
#
# Python: $PYTHON if set, else the first of .venv/bin/python, .venv-gpu/bin/python, python3 whose
# jax sees the platform. With none, it installs jax[cuda12] and the project into .venv-gpu (needs
# a package index); on a machine without one, carry the wheels in .whl/ (installed from there with
# --no-index into /tmp/site). The project is imported from this checkout (PYTHONPATH).
set -euo pipefail

usage() { sed -n '2,17p' "$0"; }
die() { echo "gpu_check: $*" >&2; exit 1; }
say() { echo "== $*"; }

platform=gpu dry=0 out='' given="$*"
while [[ $# -gt 0 ]]; do
  case $1 in
    --platform) [[ $# -ge 2 ]] || die '--platform needs gpu or cpu'; platform=$2; shift 2 ;;
    --dry) dry=1; shift ;;
    --out) [[ $# -ge 2 ]] || die '--out needs a path prefix'; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ $platform == gpu || $platform == cpu ]] || die "--platform must be gpu or cpu, not '$platform'"

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [[ -z $out ]]; then
  # A dry run writes beside a temporary prefix, never over the committed table.
  if [[ $dry == 1 ]]; then out=$(mktemp -d)/bench_gpu; else out=experiments/results/bench_gpu; fi
fi
mkdir -p "$(dirname "$out")"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ $platform == cpu ]]; then export JAX_PLATFORMS=cpu; else export JAX_PLATFORMS=cuda; fi

# -- a python whose jax sees the platform and that imports the project --------------------------
sees_platform() {  # $1: python
  "$1" - "$platform" >/dev/null 2>&1 <<'PY'
import sys
import jax
sys.exit(0 if jax.default_backend() == sys.argv[1] else 1)
PY
}
imports_project() {  # $1: python
  "$1" -c 'import ccl_jax.step, ml_collections, flax, optax, chex' >/dev/null 2>&1
}
find_python() {
  local c
  for c in ${PYTHON:-} .venv/bin/python .venv-gpu/bin/python python3; do
    if command -v "$c" >/dev/null 2>&1 && sees_platform "$c"; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

py=$(find_python) || py=''
if [[ -z $py && -d .whl ]]; then
  say "installing the carried wheels in .whl/ into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || die 'installing .whl/*.whl failed'
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  py=$(find_python) || py=''
fi
if [[ -z $py && $platform == gpu ]]; then
  say "no python here sees a GPU through jax: installing jax[cuda12] into .venv-gpu"
  python3 -m venv .venv-gpu || die 'python3 -m venv failed (python3 >= 3.12 with venv needed)'
  .venv-gpu/bin/pip install -q -U 'jax[cuda12]' -e . ||
    die 'pip could not install jax[cuda12] and the project (no package index reachable?).
    Carry wheels instead: see the header of this script.'
  py=.venv-gpu/bin/python
  seen=$("$py" -c 'import jax; print(jax.devices())' 2>&1 | tail -1) || true
  sees_platform "$py" || die "jax in .venv-gpu sees no GPU: $seen"
fi
[[ -n $py ]] ||
  die "no python with jax that sees '$platform' (tried \$PYTHON, .venv, .venv-gpu, python3)"
if ! imports_project "$py"; then
  say "the project's dependencies are missing for $py: installing them with pip"
  "$py" -m pip install -q -e . ||
    die "cannot import the project with $py and pip could not install it; carry its wheels in .whl/"
fi
imports_project "$py" || die "$py still cannot import ccl_jax and its dependencies"
"$py" - <<'PY'
import jax, jaxlib
print(f'== python ok: jax {jax.__version__}, jaxlib {jaxlib.__version__}, devices {jax.devices()}')
PY

# -- what to time ------------------------------------------------------------------------------
if [[ $dry == 1 ]]; then  # the same flow, tiny: a handful of cases, small batches, one round
  cnn_batch=8 mlp_batch=32 steps=2 repeats=1 epoch=(--epoch_steps 2) limit=900
  cnn=(cifar10_cnn_bp cifar10_ccl cifar10_ccl:compute_dtype=bfloat16 cifar10_ccl:conv_impl=im2col
    'cifar10_cnn_bp:rule=fa')
  mlp=(cifar10_mlp_bp cifar10_mlp_ccl cifar10_mlp_fa cifar10_mlp_bp:compute_dtype=bfloat16)
else
  cnn_batch=128 mlp_batch=256 steps=16 repeats=8 epoch=() limit=330
  # A rolled scan of the steps (scan_unroll=1): the CPU configs inline them, which only lengthens
  # compiles on a GPU.
  u=scan_unroll=1
  cnn=("cifar10_cnn_bp:$u" "cifar10_ccl:$u" "cifar10_cnn_bp:$u:compute_dtype=bfloat16"
    "cifar10_ccl:$u:compute_dtype=bfloat16" "cifar10_ccl:$u:conv_impl=im2col"
    "cifar10_cnn_bp:$u:rule=fa" "cifar10_cnn_bp:$u:rule=kp:optimizer.forward.weight_decay=0.0")
  # FA, sign symmetry, KP and WM run the sigmoid 3072-1000-10 net: cifar10_sigmoid_bp is their BP.
  mlp=(cifar10_mlp_bp cifar10_mlp_ccl cifar10_sigmoid_bp cifar10_mlp_fa cifar10_mlp_sign_symmetry
    cifar10_mlp_kp cifar10_mlp_wm cifar10_mlp_dfa cifar10_mlp_drtp cifar10_mlp_dtp cifar10_mlp_fwdtp
    cifar10_mlp_drl cifar10_mlp_ldrl cifar10_mlp_global cifar10_mlp_predsim
    cifar10_mlp_bp:compute_dtype=bfloat16 cifar10_mlp_ccl:compute_dtype=bfloat16)
fi
join() { local IFS=,; echo "$*"; }

bench() {  # $1: group name, $2: batch, $3: configs (comma-separated), rest: extra flags
  local name=$1 batch=$2 configs=$3
  shift 3
  say "timing the $name cases (batch $batch; at most ${limit}s)"
  if ! timeout "$limit" "$py" experiments/benchmark.py --configs "$configs" --batch_sizes "$batch" \
    --steps "$steps" --repeats "$repeats" --torch off "$@" --out "${out}_$name" \
    2>&1 | { grep -v -i 'warn' || true; } | tee "${out}_$name.log"; then
    die "the $name benchmark failed or ran over ${limit}s: see ${out}_$name.log"
  fi
  [[ -s ${out}_$name.jsonl ]] || die "the $name benchmark wrote no ${out}_$name.jsonl"
}
bench cnn "$cnn_batch" "$(join "${cnn[@]}")" ${epoch[@]+"${epoch[@]}"}
bench mlp "$mlp_batch" "$(join "${mlp[@]}")" --epoch_steps 0

# -- the table --------------------------------------------------------------------------------
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
  head -1) || gpu=''
"$py" - "$out" "$platform" "$dry" "${gpu:-none}" "$0 $given" <<'PY'
import json, sys, time
import jax, jaxlib
out, platform, dry, gpu, command = sys.argv[1:]
rows = {g: [json.loads(l) for l in open(f'{out}_{g}.jsonl')] for g in ('cnn', 'mlp')}
lines = [
  f'# Training speed on {jax.devices()[0].device_kind} ({platform})',
  '',
  f'{time.strftime("%Y-%m-%d")}; GPU: {gpu}; jax {jax.__version__}, jaxlib {jaxlib.__version__}.',
  f'Command: `{command.strip()}`'
  + (' (a DRY run: tiny batches, not a measurement)' if dry == '1' else ''),
  'Each row: `experiments/benchmark.py` in the same process as its matmul roof (fp32, or bf16 for',
  'the bf16 rows); `step_over_bp` is over BP on the same network, dtype and conv_impl.',
  '',
  '## Targets (issue 17)',
  '',
]
for r in rows['cnn']:
  if r['rule'] in ('bp', 'ccl') and 'conv_impl=' not in r['config']:
    epoch = r['epoch_s']
    lines.append(
      f"- {r['config']} ({r['compute_dtype']}): epoch {epoch:.2f} s"
      + (f" (target < 5 s: {'met' if epoch < 5 else 'NOT met'})" if r['rule'] == 'ccl' else '')
      + f", {r['roof_fraction']:.2f} of the {r['compute_dtype']} matmul roof"
      + (' (target >= 0.40: ' + ('met' if r['roof_fraction'] >= 0.4 else 'NOT met') + ')'
         if r['compute_dtype'] == 'bfloat16' else '')
    )
titles = {'cnn': 'CIFAR-10 cnn_pool, batch 128', 'mlp': 'CIFAR-10 MLPs, every rule, batch 256'}
for group, title in titles.items():
  lines += ['', f'## {title}', '']
  table = open(f'{out}_{group}.md').read().split('\n\n')[-1].strip()
  lines.append(table)
open(f'{out}.md', 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines))
PY
say "wrote $out.md"
