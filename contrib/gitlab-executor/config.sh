#!/bin/sh
# config_exec: the job's build and cache directories (in the VM), its host name, the
# driver; job_env reaches the later stages.
. "$(dirname "$0")/base.sh"
need_job
cat <<JSON
{
  "builds_dir": "$BUILDS_DIR",
  "cache_dir": "$CACHE_DIR",
  "builds_dir_is_shared": false,
  "hostname": "$VM",
  "driver": {"name": "vmctl", "version": "$DRIVER_VERSION"},
  "job_env": {"VMCTL_GITLAB_VM": "$VM"}
}
JSON
