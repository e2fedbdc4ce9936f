#!/bin/bash
# Submit again only the participants the app's failure table names (failed or missing), with
# the group level after them.
#
#   resubmit.sh BIDS_DIR OUTPUT_DIR [the hsf-bids options given to submit.sh...]
#
# OUTPUT_DIR/group_failures.tsv is written by the group job (submit.sh runs it after every task,
# whether they succeeded or not), so this needs no accounting database (sacct). Run it once that
# group job has ended. Same environment as submit.sh.
set -euo pipefail
if (($# < 2)); then
    echo "usage: $0 BIDS_DIR OUTPUT_DIR [hsf-bids options...]" >&2
    exit 64
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bids=$(realpath "$1")
out=$(realpath -m "$2")
shift 2
failures=$out/group_failures.tsv
if [[ ! -f $failures ]]; then
    echo "no $failures: run the group level (submit.sh's group job) first" >&2
    exit 66
fi
jobs=$(realpath -m "${HSF_BIDS_JOBS:-hsf_bids_jobs}")
mkdir -p "$jobs"
read -r -a app <<<"${HSF_BIDS:-hsf-bids}"
stamp=$(date +%Y%m%d-%H%M%S)
# The table lists every subject of the dataset without outputs; keep those the run would
# segment, so a subject without a usable image is not submitted again and again.
selected=$jobs/participants_$stamp.txt
"${app[@]}" "$bids" "$out" participant --list-participants "$@" >"$selected"
list=$jobs/resubmit_$stamp.txt
awk -F'\t' 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "participant_id") c = i; next }
    c { sub(/^sub-/, "", $c); print $c }' "$failures" | grep -Fxf "$selected" >"$list" || true
echo "resubmitting $(grep -c . "$list" || true) participant(s) from $failures"
HSF_BIDS_LIST=$list exec "$here/submit.sh" "$bids" "$out" "$@"
