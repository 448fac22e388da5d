# Shared body of the sbatch scripts (sourced). Needs CONFIG; optional LAUNCHER (torchrun|deepspeed),
# EXTRA_ARGS (key=value overrides), RUN_DIR (default: the config's run.output_dir/run.name, where the trainer
# writes its pid files). Uses the repository's .venv when there is one, so nothing depends on the caller's PATH.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
: "${CONFIG:?set CONFIG to a configs/*.yaml}"
if [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
LAUNCHER="${LAUNCHER:-torchrun}"
# shellcheck disable=SC2086
RUN_DIR="${RUN_DIR:-$(PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" python -c 'import sys
from t2i_train.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).run_dir)' "$CONFIG" ${EXTRA_ARGS:-})}"
echo "[slurm] config $CONFIG, run directory $RUN_DIR"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1
HOSTFILE="${HOSTFILE:-slurm-${SLURM_JOB_ID:-local}.hostfile}"
PREEMPTED=0

# One task per node; each runs the launcher for its node's GPUs. Single quotes: evaluated on the node
# (SLURM_NODEID differs per node).
LAUNCH='CMD=$(python slurm/launch_cmd.py --launcher '"$LAUNCHER"' --hostfile '"$HOSTFILE"' -- --config '"$CONFIG"' '"${EXTRA_ARGS:-}"') && echo "[$(hostname)] $CMD" && eval "$CMD"'

forward_signal() {
  # Slurm sends USR1 to this shell ${SIGNAL_LEAD:-300}s before the time limit (#SBATCH --signal=B:USR1@300).
  # Forward it to the training processes (their pids are in RUN_DIR/pids); they checkpoint and exit cleanly.
  PREEMPTED=1
  echo "[slurm] USR1: asking the trainer for a checkpoint"
  srun --overlap --ntasks-per-node=1 bash -c 'for f in '"${RUN_DIR}"'/pids/$(hostname).*; do [ -e "$f" ] && kill -USR1 "$(cat "$f")" || true; done'
}
trap forward_signal USR1

srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "$LAUNCH" &
SRUN_PID=$!
while true; do
  set +e
  wait "$SRUN_PID"
  STATUS=$?
  set -e
  # wait returns >128 when interrupted by the trapped signal: keep waiting for the checkpoint
  if kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done

if [ "$PREEMPTED" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "[slurm] checkpoint written; requeueing job ${SLURM_JOB_ID} (resumes from RUN_DIR/checkpoints/latest)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
