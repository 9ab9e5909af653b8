#!/bin/sh
# prepare_exec: the job's VM, ephemeral with a TTL (the agent deletes it if cleanup never
# comes), from the warm pool or the template; ready when SSH logs in.
. "$(dirname "$0")/base.sh"
need_job
if [ -n "${VMCTL_GITLAB_POOL:-}" ]; then
    source_opt="--pool=$VMCTL_GITLAB_POOL"
elif [ -n "${VMCTL_GITLAB_TEMPLATE:-}" ]; then
    source_opt="--template=$VMCTL_GITLAB_TEMPLATE"
else
    system_failure "set VMCTL_GITLAB_TEMPLATE or VMCTL_GITLAB_POOL in the runner's environment"
fi
# a retried job: its earlier VM goes first
vmctl_ delete "$VM" --yes >/dev/null 2>&1
echo "Creating VM $VM ($source_opt) with vmctl"
if ! vmctl_ create "$VM" "$source_opt" --ephemeral --ttl "${VMCTL_GITLAB_TTL:-3h}" --quiet
then
    vmctl_ delete "$VM" --yes >/dev/null 2>&1
    system_failure "could not create VM $VM"
fi
if ! vmctl_ ssh "$VM" -- "mkdir -p $BUILDS_DIR $CACHE_DIR"; then
    vmctl_ delete "$VM" --yes >/dev/null 2>&1
    system_failure "VM $VM does not answer over SSH"
fi
