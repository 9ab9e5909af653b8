# Shared by the stages of the vmctl driver for GitLab Runner's custom executor (sourced).
#
# Settings (the runner's environment, e.g. [[runners]] environment = [...]):
#   VMCTL_GITLAB_TEMPLATE  warm-start each job's VM from this template, or
#   VMCTL_GITLAB_POOL      take it from this warm pool (hand-over in under a second)
#   VMCTL_GITLAB_TTL       the VM's TTL, the agent's safety net (default 3h)
#   VMCTL_GITLAB_HOST      the agent (vmctl -H); default: vmctl's own default
#   VMCTL                  the vmctl program (default: vmctl on PATH)
# The runner gives each stage the job's variables as CUSTOM_ENV_*, and the exit codes
# it expects as BUILD_FAILURE_EXIT_CODE and SYSTEM_FAILURE_EXIT_CODE.

set -u

VMCTL="${VMCTL:-vmctl}"
JOB_ID="${CUSTOM_ENV_CI_JOB_ID:-}"
VM="gitlab-${JOB_ID}"
BUILDS_DIR=/tmp/gitlab/builds
CACHE_DIR=/tmp/gitlab/cache
DRIVER_VERSION=1.0.0

vmctl_() {
    if [ -n "${VMCTL_GITLAB_HOST:-}" ]; then
        "$VMCTL" -H "$VMCTL_GITLAB_HOST" "$@"
    else
        "$VMCTL" "$@"
    fi
}

system_failure() {
    echo "vmctl executor: $*" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-1}"
}

need_job() {
    case "$JOB_ID" in
        ''|*[!0-9]*) system_failure "CUSTOM_ENV_CI_JOB_ID is missing or not a number" ;;
    esac
}
