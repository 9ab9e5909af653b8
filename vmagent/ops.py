"""The table of agent operations: declared once, used by the server and the CLI client.

Each row says how an operation is reached over HTTP (method and path under ``/v1``),
whether it takes the VM's operation lock, and which parameters it accepts. The server
registers one route per row and dispatches to ``Manager.op_<name>``; the vmctl client
calls operations by name and builds the request from the same row. Path parameters are
written ``{name}`` (a VM), ``{image}`` (an image) or ``{template}`` (a template); other
parameters go in the JSON body for POST/PUT/DELETE and in the query string for GET.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmagent.spec import VMSpec

API_PREFIX = "/v1"


@dataclass(frozen=True)
class Operation:
    name: str
    method: str
    path: str
    summary: str
    lock: bool = False            # serialized with the VM's other locked operations
    params: tuple[str, ...] = ()  # accepted body/query parameters besides path params
    websocket: bool = False       # a bidirectional stream (console, tunnel)

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(re.findall(r"{(\w+)}", self.path))

    @property
    def url_path(self) -> str:
        return API_PREFIX + self.path

    def render_path(self, values: dict) -> str:
        """The concrete path with path parameters filled in (``values`` keeps the rest)."""
        path = self.url_path
        for p in self.path_params:
            if p not in values:
                raise KeyError(f"operation {self.name!r} needs parameter {p!r}")
            path = path.replace("{" + p + "}", str(values[p]))
        return path


_SPEC = tuple(f for f in VMSpec.FIELDS if f != "name")

OPERATIONS: tuple[Operation, ...] = (
    Operation("host", "GET", "/host", "Agent version, accel, capacity and qemu version"),
    Operation("list", "GET", "/vms", "All VMs with their state"),
    Operation("create", "POST", "/vms", "Create a VM from a spec and start it",
              lock=True, params=("name", *_SPEC, "dry_run", "start", "template")),
    Operation("status", "GET", "/vms/{name}", "One VM: spec, state, pid, accel, SSH port, "
              "readiness (ssh, cloud-init)"),
    Operation("delete", "DELETE", "/vms/{name}", "Stop the VM and remove all its files",
              lock=True),
    Operation("push_config", "POST", "/vms/{name}/config",
              "Change the spec or user-data; applied at the next boot",
              lock=True, params=_SPEC),
    Operation("start", "POST", "/vms/{name}/start", "Start a stopped VM", lock=True),
    Operation("reboot", "POST", "/vms/{name}/reboot",
              "Reboot through the guest (guest agent, then ACPI), falling back to reset",
              lock=True, params=("timeout",)),
    Operation("shutdown", "POST", "/vms/{name}/shutdown",
              "ACPI powerdown, wait up to timeout seconds, then force", lock=True,
              params=("timeout",)),
    Operation("reset", "POST", "/vms/{name}/reset", "Hardware reset (QMP system_reset)",
              lock=True),
    Operation("poweroff", "POST", "/vms/{name}/poweroff", "Stop qemu immediately",
              lock=True),
    Operation("hard_reset", "POST", "/vms/{name}/hard_reset",
              "Kill qemu and start it again", lock=True),
    Operation("snapshot", "POST", "/vms/{name}/snapshots",
              "Take a live internal qcow2 snapshot", lock=True, params=("snapshot",)),
    Operation("snapshots", "GET", "/vms/{name}/snapshots", "List the VM's snapshots"),
    Operation("console_log", "GET", "/vms/{name}/console/log",
              "The serial console log from byte offset on", params=("offset", "tail")),
    Operation("console", "GET", "/vms/{name}/console",
              "Attach to the serial console (websocket)", websocket=True),
    Operation("tunnel", "GET", "/vms/{name}/tunnel",
              "A TCP stream to the guest's SSH port (websocket)", websocket=True),
    Operation("image_list", "GET", "/images",
              "Images in the store and catalog entries available to pull"),
    Operation("image_import", "POST", "/images",
              "Import an image from a file on the agent's host",
              params=("image", "path", "kernel", "initrd", "append", "sha256",
                      "description")),
    Operation("image_pull", "POST", "/images/{image}/pull",
              "Download a catalog image (or a URL) and verify its digest",
              params=("url", "sha256")),
    Operation("image_remove", "DELETE", "/images/{image}",
              "Remove an image no VM uses"),
    # image builds (buildjobs.py): a background job, one at a time; poll its status
    Operation("image_build", "POST", "/images/{image}/build",
              "Start building an image from its catalog recipe (debootstrap from the "
              "package mirror); returns the job", params=("replace",)),
    Operation("image_build_status", "GET", "/images/{image}/build",
              "The image's latest build: state, steps with durations, log tail, result"),
    # templates (templates.py): a booted guest's saved state; create with template=T
    # warm-starts a clone from it
    Operation("template_create", "POST", "/templates",
              "Boot a VM from an image, save its RAM and device state as a template",
              params=("template", "image", "cpus", "memory", "disk", "ssh_keys", "admins",
                      "user_data", "timeout")),
    Operation("template_list", "GET", "/templates", "All templates"),
    Operation("template_show", "GET", "/templates/{template}", "One template"),
    Operation("template_remove", "DELETE", "/templates/{template}",
              "Remove a template (refused while VMs use it, unless force)",
              params=("force",)),
)

BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}


def get(name: str) -> Operation:
    return BY_NAME[name]
