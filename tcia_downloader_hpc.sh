#!/usr/bin/env bash
#SBATCH --job-name=tcia-download
#SBATCH --cpus-per-task=4
#SBATCH --mem=4G
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#
# tcia_downloader_hpc.sh: run tcia_downloader.pyz (or tcia_downloader.py from a checkout) as a
# slurm job, or as a plain script.
#
#   sbatch tcia_downloader_hpc.sh                      one job, the whole collection
#   sbatch tcia_downloader_hpc.sh --manifest x.tcia    extra flags go to the downloader
#   sbatch --array=0-7 --output=%x-%A_%a.out tcia_downloader_hpc.sh
#                                                      8 tasks, one shard of the collection each
#   ./tcia_downloader_hpc.sh                           on a machine without slurm
#
# Submit from the folder that holds tcia_downloader.pyz or tcia_downloader.py (slurm runs a
# copy of this file from its spool folder), or set TCIA_DOWNLOADER to the one to run. The
# .pyz brings its packages and unpacks them once to SHIV_ROOT (below); the .py needs
# requirements.txt installed for PYTHON.
#
# A job pending with Reason=PartitionConfig asks for more than the partition's nodes have
# (4 CPUs or 4G above; `sinfo -o "%P %c %m"` shows what they have): ask for less when you
# submit, e.g. `sbatch --cpus-per-task=2 --mem=2G tcia_downloader_hpc.sh` (command-line
# options override the #SBATCH lines). It never starts, so it cannot say so itself.
#
# Time limits: 300 s before the limit slurm sends SIGUSR1 (--signal above); the downloader
# then starts no new series, lets the running ones finish within STOP_GRACE seconds, and
# exits with 75, and this script requeues the job, which resumes where it stopped. A job
# that finished (0), or whose failure a rerun will not fix (2: bad flags, unknown
# collection, wrong password), is not requeued; nor is one cancelled with scancel.
# Keep STOP_GRACE below the 300 s of --signal, and raise both for very large series.

# ----- edit here ----------------------------------------------------------------------------
COLLECTION="${COLLECTION:-Pancreas-CT}"
OUTPUT_DIR="${OUTPUT_DIR:-$HOME/tcia}"                            # the archive goes here
TEMP_DIR="${TEMP_DIR:-${SLURM_TMPDIR:-${TMPDIR:-$OUTPUT_DIR}}}"    # node-local scratch if any
CACHE_DIR="${CACHE_DIR:-$HOME/.cache/tcia_downloader}"             # logs and metadata cache
WORKERS="${WORKERS:-}"            # empty: 4 per CPU of the job (16 at most), one packing per CPU
STOP_GRACE="${STOP_GRACE:-240}"
PYTHON="${PYTHON:-python3}"
export SHIV_ROOT="${SHIV_ROOT:-$CACHE_DIR/pyz}"   # where a .pyz unpacks (about 15 MB per build)
# source "$HOME/venvs/tcia/bin/activate"                           # optional virtual environment
# ---------------------------------------------------------------------------------------------

set -uo pipefail

EXIT_USAGE=2
EXIT_CHECKPOINT=75

script_dir="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
downloader="${TCIA_DOWNLOADER:-}"
if [[ -z "$downloader" ]]; then
    downloader="$script_dir/tcia_downloader.pyz"
    [[ -f "$downloader" ]] || downloader="$script_dir/tcia_downloader.py"
fi
if [[ ! -f "$downloader" ]]; then
    echo "tcia_downloader_hpc.sh: $downloader not found: submit from the folder of tcia_downloader.pyz or tcia_downloader.py, or set TCIA_DOWNLOADER" >&2
    exit "$EXIT_USAGE"
fi
if [[ "$downloader" != *.pyz ]] &&
   ! "$PYTHON" -c "import requests, requests_cache, pydicom, tqdm" 2>/dev/null; then
    echo "tcia_downloader_hpc.sh: $PYTHON lacks the requirements: $PYTHON -m pip install -r $(dirname "$downloader")/requirements.txt" >&2
    exit "$EXIT_USAGE"
fi

# COLLECTION applies unless the extra flags say what to download themselves.
selection=(--collection "$COLLECTION")
for arg in "$@"; do
    case "$arg" in
        --collection|--collection=*|--manifest|--manifest=*|--retry-failed|--retry-failed=*|--list-collections)
            selection=() ;;
    esac
done
args=("${selection[@]}" --output "$OUTPUT_DIR" --temp_dir "$TEMP_DIR"
      --cache_dir "$CACHE_DIR" --compression --stop-grace "$STOP_GRACE")
[[ -n "$WORKERS" ]] && args+=(--workers "$WORKERS")

echo "$(date '+%F %T') tcia_downloader_hpc.sh: job ${SLURM_JOB_ID:-none}" \
     "array task ${SLURM_ARRAY_TASK_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on $(hostname)"
echo "$(date '+%F %T') running: $PYTHON $downloader ${args[*]} $*"

# The downloader runs in the background so that this shell can pass signals on: bash
# delays trapped signals until a foreground command ends, but `wait` returns at once.
# The traps come first: a signal before them would end this shell instead.
child=""
warned=0
pass_on() { [[ -n "$child" ]] && kill "-$1" "$child" 2>/dev/null; }
trap 'warned=1; pass_on USR1' USR1
trap 'pass_on TERM' TERM
trap 'pass_on INT' INT
"$PYTHON" "$downloader" "${args[@]}" "$@" &
child=$!
[[ "$warned" -eq 1 ]] && pass_on USR1      # warned while it was being started
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"          # the child's own exit status (bash remembers it)
status=$?

# A warning in the first second can reach Python before it handles SIGUSR1 and kill it
# (status 128+10); its journal is consistent at every instant, so that is a checkpoint too.
if [[ "$warned" -eq 1 && "$status" -eq $((128 + $(kill -l USR1))) ]]; then
    status=$EXIT_CHECKPOINT
fi
if [[ "$status" -eq "$EXIT_CHECKPOINT" && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "$(date '+%F %T') checkpointed before the time limit: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
echo "$(date '+%F %T') $(basename "$downloader") exited with $status"
exit "$status"
