# Sourced by tests/run.sh and tests/labelstudio.sh: long installs say what they are doing.
#
#   run_with_progress LABEL LOG CMD...
# runs CMD with its output in LOG; while it runs, every LSDEPLOY_PROGRESS_SECONDS (15) prints to
# stderr how long it has taken and the step it is at (pip's last Collecting/Downloading/Installing
# line). Returns CMD's exit status; on failure the end of LOG is printed.

run_with_progress() {
    local label="$1" log="$2"
    shift 2
    local every="${LSDEPLOY_PROGRESS_SECONDS:-15}" started=$SECONDS waited=0 status=0 step
    "$@" >"$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        waited=$((waited + 1))
        if [ "$waited" -ge "$every" ] && kill -0 "$pid" 2>/dev/null; then
            waited=0
            step=$(grep -E '^(Collecting|Downloading|Installing|Building|Obtaining|Preparing)' "$log" 2>/dev/null \
                   | tail -n 1 | cut -c1-100)
            echo "  $label: $((SECONDS - started)) s${step:+, at: $step}" >&2
        fi
    done
    wait "$pid" || status=$?
    if [ "$status" -ne 0 ]; then
        grep -v "^WARNING: Location" "$log" | tail -n 20 >&2
        echo "$label failed with exit status $status (log: $log)" >&2
    elif [ $((SECONDS - started)) -ge "$every" ]; then
        echo "  $label: done in $((SECONDS - started)) s" >&2
    fi
    return "$status"
}
