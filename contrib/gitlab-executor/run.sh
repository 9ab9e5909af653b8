#!/bin/sh
# run_exec SCRIPT STAGE: the runner's script for one stage, run by bash in the job's VM
# over SSH. Its failure is a build failure; vmctl's own (no VM: 3, no agent: 6, ssh
# failed: 255) is a system failure. With BUILD_EXIT_CODE_FILE (newer runners) the
# script's own exit code is written there.
. "$(dirname "$0")/base.sh"
need_job
script="${1:-}"
stage="${2:-}"
[ -n "$script" ] && [ -r "$script" ] || system_failure "run: no readable script given (stage '$stage')"
vmctl_ ssh "$VM" -- bash -s < "$script"
rc=$?
case "$rc" in
    0) exit 0 ;;
    3|6|255) system_failure "stage $stage: vmctl could not reach VM $VM (exit $rc)" ;;
esac
if [ -n "${BUILD_EXIT_CODE_FILE:-}" ]; then
    echo "$rc" > "$BUILD_EXIT_CODE_FILE"
fi
echo "vmctl executor: stage $stage failed (exit $rc)" >&2
exit "${BUILD_FAILURE_EXIT_CODE:-1}"
