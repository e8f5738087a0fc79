#!/usr/bin/env bash
# The GPU checks of the online loop, as one script, run from the repository root on a GPU machine:
#   1. the machine: jax version, backend and devices;
#   2. the fused online loop (plan -> env step -> replay -> updates in one program) on walker-walk with
#      ONLINE_ENVS (256) envs: agent steps/s, env steps/s, updates/s, next to its parts timed apart
#      (benchmarks/online.py; ONLINE_AGENT_STEPS x ONLINE_REPEATS timed agent steps, about 1-2 minutes);
#   3. the compile time, peak RSS and memory mappings of the all-30-task evaluation program
#      (benchmarks/compile_eval.py --tasks all, from an empty cache).
#
# Usage: bash benchmarks/gpu/run.sh [OUTDIR] [PARTS]
#   OUTDIR  where the logs go (default runs/gpu): machine.log, online.log, compile.log, summary.md
#   PARTS   any of "online compile" (default both), for machines that cap one command's time
# Environment:
#   GPU_DEPS=.gpu/deps.tar.xz  archive from `python benchmarks/gpu/pack_deps.py` (mujoco, mjx, dm_control,
#                              playground...), unpacked into GPU_SITE (/tmp/site) when `import mujoco` fails;
#                              not needed where those are installed
#   ONLINE_ENVS=256 ONLINE_AGENT_STEPS=25 ONLINE_REPEATS=3 ONLINE_TASK=walker-walk COMPILE_TASKS=all
#   STEP_TIMEOUT=540           seconds each part may run before it is stopped (its log so far is kept)
#   ALLOW_CPU=0                1 runs the same parts on a CPU backend (a dry run of the script itself)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/gpu}
parts=${2:-online compile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
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
    *) echo "unknown part '$part' (online, compile)" >&2; exit 2 ;;
  esac
  echo "== $part: ${cmd[*]}"
  start=$(date +%s)
  timeout "$step_timeout" "${cmd[@]}" 2>&1 | tee "$out/$part.log"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - start ))
  { echo; echo "## $part (exit $rc, ${took} s wall): \`${cmd[*]}\`"; grep -E '^\||GiB|compile' "$out/$part.log"; } >> "$summary"
  [[ $rc -ne 0 ]] && status=$rc
done
echo "summary: $summary"
exit $status
