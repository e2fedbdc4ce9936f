#!/bin/bash
# Run hsf_bids on a SLURM cluster: one array task per participant, then the group level.
#
#   submit.sh BIDS_DIR OUTPUT_DIR [hsf-bids options...]
#
# The participants come from the app itself (hsf-bids ... --list-participants): only those with
# an image the run would segment, whatever participants.tsv lists. Every task writes into the one
# OUTPUT_DIR. The group job starts when every task has ended (afterany, not afterok: it also
# writes group_failures.tsv, which resubmit.sh reads).
#
# Environment:
#   HSF_BIDS          the app command (default: hsf-bids; the container: .../hsf-bids-container)
#   HSF_BIDS_JOBS     folder for the participant lists and the jobs' logs (default: ./hsf_bids_jobs)
#   HSF_BIDS_SBATCH   more sbatch options for every job, e.g. "--partition=short --cpus-per-task=8"
#   HSF_BIDS_THROTTLE at most this many tasks at once (sbatch --array=1-N%THROTTLE)
#   HSF_BIDS_LIST     submit this participant list instead of the app's (resubmit.sh sets it)
set -euo pipefail
if (($# < 2)); then
    echo "usage: $0 BIDS_DIR OUTPUT_DIR [hsf-bids options...]" >&2
    exit 64
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bids=$(realpath "$1")
out=$(realpath -m "$2")
shift 2
jobs=$(realpath -m "${HSF_BIDS_JOBS:-hsf_bids_jobs}")
mkdir -p "$jobs"
read -r -a app <<<"${HSF_BIDS:-hsf-bids}"
read -r -a extra <<<"${HSF_BIDS_SBATCH:-}"

list=${HSF_BIDS_LIST:-}
if [[ -z $list ]]; then
    list=$jobs/participants_$(date +%Y%m%d-%H%M%S).txt
    "${app[@]}" "$bids" "$out" participant --list-participants "$@" >"$list"
fi
n=$(grep -c . "$list" || true)
if ((n == 0)); then
    echo "no participant to run (list $list)"
    exit 0
fi
array=$(sbatch --parsable "${extra[@]}" --array="1-$n${HSF_BIDS_THROTTLE:+%$HSF_BIDS_THROTTLE}" \
    --output="$jobs/%x_%A_%a.log" "$here/participant.sbatch" "$bids" "$out" "$list" "$@")
array=${array%%;*}
group=$(sbatch --parsable "${extra[@]}" --dependency="afterany:$array" \
    --output="$jobs/%x_%j.log" "$here/group.sbatch" "$bids" "$out" "$@")
group=${group%%;*}
echo "participants: job $array ($n tasks, list $list); group: job $group; logs in $jobs"
