"""Every file name of a VM's run directory (and of a template's), in one place.

``STATE_DIR/vms/NAME/`` holds everything of one VM; ``STATE_DIR/templates/T/`` is the
frozen run dir of the VM a template was saved from, with the saved state beside it.
Socket paths are given to qemu relative to the run dir (qemu runs with the run dir as
its working directory; unix socket paths are limited to 107 bytes).
"""

from __future__ import annotations

from pathlib import Path

# the record: spec and runtime state (JSON, written atomically, versioned)
SPEC = "spec.json"
STATE = "state.json"
ARGV = "argv.json"              # the exact qemu command line of the last start
EVENTS = "events.jsonl"         # the VM's event log (bounded)
# disks and config
DISK = "disk.qcow2"             # the instance disk: a qcow2 overlay on its base
SEED = "seed.iso"               # cloud-init NoCloud
HOST_KEYS = "host_keys.json"    # the SSH host keys the agent made for the VM (0600)
CLONE_OF = "template"           # in a warm-started clone: its template's name
POOL_MEMBER = "pool.json"       # in a warm pool's member: its pool, whether it is ready
# what qemu makes while it runs
PIDFILE = "qemu.pid"
QMP_SOCK = "qmp.sock"
CONSOLE_SOCK = "console.sock"
VNC_SOCK = "vnc.sock"
QGA_SOCK = "qga.sock"
# a second QMP monitor, never used by the agent: for an operator (and the tests) to
# inspect or drive qemu (set_link, stop) while the agent holds qmp.sock
QMP_OPERATOR_SOCK = "qmp-operator.sock"
CONSOLE_LOG = "console.log"
SOCKETS = (QMP_SOCK, CONSOLE_SOCK, VNC_SOCK, QGA_SOCK, QMP_OPERATOR_SOCK)
RUNTIME_FILES = (PIDFILE, *SOCKETS)

# a template's directory: the template VM's disk and logs, plus these
TEMPLATE_RECORD = "template.json"
SAVED_STATE = "vmstate.bin"     # RAM and device state (QMP migrate to a file)


def clear_runtime(run_dir: Path) -> None:
    """Remove what a previous qemu left (pidfile, sockets) before a start."""
    for name in RUNTIME_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
