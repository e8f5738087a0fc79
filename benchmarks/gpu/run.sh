#!/usr/bin/env bash
# The GPU checks of the online loop, as one script, run from the repository root on a GPU machine:
#   1. the machine: jax version, backend and devices;
#   2. the fused online loop (plan -> env step -> replay -> updates in one program) on walker-walk with
#      ONLINE_ENVS (256) envs: agent steps/s, env steps/s, updates/s, next to its parts timed apart
#      (benchmarks/online.py; ONLINE_AGENT_STEPS x ONLINE_REPEATS timed agent steps, about 1-2 minutes);
#   3. the compile time, peak RSS and memory mappings of the all-30-task evaluation program
#      (benchmarks/compile_eval.py --tasks all, from an empty cache);
#   4. the same-run comparison with the official PyTorch TD-MPC2 on the GPU (benchmarks/compare_official.py
#      --device=gpu): equality checks, then update (COMPARE_SIZES), act for 1, 30 and 300 envs, bf16 act, the
#      distillation step with the COMPARE_TEACHERS teacher in bf16 (its share of the bf16 matmul peak), and with
#      COMPARE_TORCH_COMPILE=1 the official update and act under torch.compile (reduce-overhead, as compile: true);
#   5. evaluation throughput against the official sequential loop: 30 tasks x COMPARE_EVAL_EPISODES episodes
#      (300 envs), COMPARE_EVAL_STEPS agent steps each (compare_official.py --parts=eval).
#
# Usage: bash benchmarks/gpu/run.sh [OUTDIR] [PARTS]
#   OUTDIR  where the logs go (default runs/gpu): machine.log, online.log, compile.log, summary.md
#   PARTS   any of "online compile compare compare_eval" (default all four), for machines that cap one
#           command's time
# Environment:
#   GPU_DEPS=.gpu/deps.tar.xz  archive from `python benchmarks/gpu/pack_deps.py` (mujoco, mjx, dm_control,
#                              playground...), unpacked into GPU_SITE (/tmp/site) when `import mujoco` fails;
#                              not needed where those are installed
#   ONLINE_ENVS=256 ONLINE_AGENT_STEPS=25 ONLINE_REPEATS=3 ONLINE_TASK=walker-walk COMPILE_TASKS=all
#   TDMPC2_REPO=.gpu/tdmpc2    a checkout of github.com/nicklashansen/tdmpc2 (tested at e9f5932; its tdmpc2/ folder
#                              and config are what is read), for the compare parts; pack the archive with
#                              pack_deps.py --official for its tensordict and gymnasium
#   COMPARE_SIZES=1,5 (empty: no update rows) COMPARE_TEACHERS=317 COMPARE_REPEATS=6 COMPARE_ACT_REPEATS=3
#   COMPARE_TORCH_COMPILE=0     1 adds the official update and act under torch.compile (minutes of compile more)
#   COMPARE_BUDGET=0            seconds after which the compare part starts no further row (listed as skipped)
#   COMPARE_ACT_ENVS=1,30,300 COMPARE_BF16=1 COMPARE_CHECKS=1 (0: --no-checks, rows only)
#   COMPARE_ON_MISMATCH=stop    report: an equality check that fails is stated in the table, the rows timed anyway
#   COMPARE_EVAL_EPISODES=10 COMPARE_EVAL_STEPS=10 COMPARE_EVAL_TASKS=all
#   COMPARE_EVAL_OFFICIAL_EPISODES=  episodes per task of the official loop (default COMPARE_EVAL_EPISODES; its
#                              loop runs one env after another, so fewer give the same agent steps/s sooner)
#   MUJOCO_GL=disable          nothing here renders (an image without EGL loaders still imports dm_control)
#   STEP_TIMEOUT=540           seconds each part may run before it is stopped (its log so far is kept);
#                              TIMEOUT_<part> (e.g. TIMEOUT_compare_eval=200) for one part
#   ALLOW_CPU=0                1 runs the same parts on a CPU backend (a dry run of the script itself)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/gpu}
parts=${2:-online compile compare compare_eval}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export MUJOCO_GL=${MUJOCO_GL:-disable}
py=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/site}
deps=${GPU_DEPS:-.gpu/deps.tar.xz}
step_timeout=${STEP_TIMEOUT:-540}

if ! "$py" -c "import mujoco, mujoco.mjx, dm_control, mujoco_playground" >/dev/null 2>&1; then
  if [[ ! -f "$deps" ]]; then
    echo "mujoco/mjx/dm_control/playground are not importable and $deps is missing:" \
         "run 'python benchmarks/gpu/pack_deps.py --python_version X.Y' where pip can download" >&2
    exit 2
  fi
  mkdir -p "$site" && tar xJf "$deps" -C "$site" || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  git log -1 --format="commit %h %s" 2>/dev/null
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
  "$py" - <<'PY'
import jax, mujoco, sys
backend = jax.default_backend()
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, mujoco {mujoco.__version__}, backend {backend}")
print("devices:", jax.devices())
PY
} 2>&1 | tee "$out/machine.log"
backend=$("$py" -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [[ "$backend" != "gpu" && "${ALLOW_CPU:-0}" != "1" ]]; then
  echo "jax's backend is '$backend', not gpu (a CUDA jaxlib and a visible GPU are needed; ALLOW_CPU=1 to dry-run)" >&2
  exit 3
fi

device=gpu
[[ "$backend" != "gpu" ]] && device=cpu  # an ALLOW_CPU dry run compares on the CPU
compare=("$py" benchmarks/compare_official.py "--tdmpc2_repo=${TDMPC2_REPO:-.gpu/tdmpc2}" "--device=$device"
         "--repeats=${COMPARE_REPEATS:-6}" "--act30_repeats=${COMPARE_ACT_REPEATS:-3}"
         "--on_mismatch=${COMPARE_ON_MISMATCH:-stop}")
[[ $device == cpu ]] && compare+=(--threads=1)
compile_rows=--no-torch_compile
checks=--checks
[[ "${COMPARE_CHECKS:-1}" == 0 ]] && checks=--no-checks
bf16=--bf16
[[ "${COMPARE_BF16:-1}" == 0 ]] && bf16=--no-bf16
[[ "${COMPARE_TORCH_COMPILE:-0}" == 1 ]] && compile_rows=--torch_compile

status=0
summary="$out/summary.md"
echo "# GPU checks ($(head -1 "$out/machine.log"))" > "$summary"
for part in $parts; do
  case $part in
    online)
      cmd=("$py" benchmarks/online.py --tasks "${ONLINE_TASK:-walker-walk}" --num_envs "${ONLINE_ENVS:-256}"
           --agent_steps "${ONLINE_AGENT_STEPS:-25}" --repeats "${ONLINE_REPEATS:-3}") ;;
    compile)
      cmd=("$py" benchmarks/compile_eval.py --tasks "${COMPILE_TASKS:-all}") ;;
    compare)
      cmd=("${compare[@]}" --parts=main "--sizes=${COMPARE_SIZES-1,5}" "--teachers=${COMPARE_TEACHERS:-317}"
           --teacher_bf16 "$compile_rows" --eval_steps=0 "--time_budget_s=${COMPARE_BUDGET:-0}"
           "--act_envs=${COMPARE_ACT_ENVS:-1,30,300}" "$checks" "$bf16"
           "--out=$out/compare_official_gpu.md") ;;
    compare_eval)
      cmd=("${compare[@]}" --parts=eval "--eval_steps=${COMPARE_EVAL_STEPS:-10}"
           "--eval_episodes=${COMPARE_EVAL_EPISODES:-10}" "--eval_tasks=${COMPARE_EVAL_TASKS:-all}"
           "--eval_official_episodes=${COMPARE_EVAL_OFFICIAL_EPISODES:-${COMPARE_EVAL_EPISODES:-10}}"
           "--out=$out/compare_official_gpu_eval.md") ;;
    *) echo "unknown part '$part' (online, compile, compare, compare_eval)" >&2; exit 2 ;;
  esac
  if [[ $part == compare* ]] && ! "$py" -c "import tensordict, gymnasium" >/dev/null 2>&1; then
    echo "$part: the official code needs tensordict and gymnasium: pack the archive with" \
         "'python benchmarks/gpu/pack_deps.py --official' (and carry it)" >&2
    status=2; continue
  fi
  echo "== $part: ${cmd[*]}"
  start=$(date +%s)
  part_timeout_var="TIMEOUT_$part"
  timeout "${!part_timeout_var:-$step_timeout}" "${cmd[@]}" 2>&1 | tee "$out/$part.log"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - start ))
  { echo; echo "## $part (exit $rc, ${took} s wall): \`${cmd[*]}\`"; grep -E '^\||^\[|GiB|compile' "$out/$part.log"; } >> "$summary"
  [[ $rc -ne 0 ]] && status=$rc
done
echo "summary: $summary"
exit $status
