"""The table of agent operations: declared once; the server, the CLI client, the
permission checks and docs/api.md derive from it.

Each row says how an operation is reached over HTTP (method and path under ``/v1``), what
it acts on (``target``: a VM, an image, a template or the host; the parameter that names
it is ``TARGET_PARAM[target]``), whether it takes the target VM's operation lock, which
parameters it accepts, whether it is a stream (a websocket to the VM's serial console,
its SSH port, ...) and how long a client waits for it (``timeout``, seconds; like the
timeouts of Ganeti's RPC table). Path parameters are written ``{name}`` (a VM),
``{image}`` or ``{template}``; other parameters go in the JSON body for POST/PUT/DELETE
and in the query string for GET.

Nothing here imports the agent's implementation: vmctl imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmagent.spec import VMSpec

API_PREFIX = "/v1"
TARGETS = ("vm", "image", "template", "pool", "host", "user")
# the parameter that names an operation's target (the host needs none)
TARGET_PARAM = {"vm": "name", "image": "image", "template": "template", "pool": "pool",
                "user": "user"}
# who may call an operation (vmagent/api/access.py checks it for every request):
#   any       every authenticated caller
#   owner     the target VM's owner and admins, and operators
#   self      the caller for themself (``user`` absent or theirs), and operators
#   operator  operators only
#   metrics   operators and metrics tokens (a token of role metrics may call nothing else)
ACCESS = ("any", "owner", "self", "operator", "metrics")
# what a stream operation connects to (vmagent/vms/streams.py opens them)
STREAMS = ("console", "ssh", "vnc")

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Operation:
    name: str
    method: str
    path: str
    summary: str
    target: str = "host"          # vm | image | template | host
    lock: bool = False            # serialized with the VM's other locked operations
    params: tuple[str, ...] = ()  # accepted body/query parameters besides path params
    stream: str | None = None     # a bidirectional websocket to this (see STREAMS)
    timeout: float = DEFAULT_TIMEOUT   # how long a client waits for the answer
    created: bool = False         # success is 201 Created (unless a dry run)
    access_override: str | None = None   # see ACCESS; default derived in ``access``
    text: bool = False            # answers text (a string), not JSON: content_type
    content_type: str = "application/json"

    @property
    def access(self) -> str:
        """Who may call it: derived from what it acts on and whether it changes
        something, so that a new row gets a rule without a line of its own."""
        if self.access_override is not None:
            return self.access_override
        if self.target == "vm":
            # one named VM: its people; the collection (list, create): everybody
            return "owner" if self.target_param in self.path_params else "any"
        if self.target == "user":
            return "self"
        return "any" if self.method == "GET" else "operator"

    @property
    def websocket(self) -> bool:
        return self.stream is not None

    @property
    def mutates(self) -> bool:
        """Whether the operation changes something (what an audit log records)."""
        return self.method != "GET"

    @property
    def target_param(self) -> str | None:
        return TARGET_PARAM.get(self.target)

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
_VM = "/vms/{name}"

OPERATIONS: tuple[Operation, ...] = (
    Operation("host", "GET", "/host", "Agent version, accel, qemu version; its name, "
              "segments and, per resource, total, allocatable, guaranteed and free"),
    Operation("host_log", "GET", "/host/log",
              "The audit log: one JSON line per operation that changed something",
              access_override="operator", params=("offset", "tail")),
    Operation("list", "GET", "/vms",
              "The VMs the caller may operate (all of them: operators with all)",
              target="vm", params=("all",)),
    Operation("create", "POST", "/vms", "Create a VM from a spec and start it (warm from "
              "a template, or taken from a warm pool)",
              target="vm", lock=True, timeout=900.0, created=True,
              params=("name", *_SPEC, "dry_run", "start", "template", "pool")),
    Operation("status", "GET", _VM, "One VM: spec, state, pid, accel, SSH port, "
              "readiness (ssh, cloud-init)", target="vm"),
    Operation("delete", "DELETE", _VM, "Stop the VM and remove all its files",
              target="vm", lock=True, timeout=300.0),
    Operation("push_config", "POST", _VM + "/config",
              "Change the spec or user-data (applied at the next boot; admins at once); "
              "operators may also give the VM another owner",
              target="vm", lock=True, params=(*_SPEC, "owner"), timeout=300.0),
    Operation("start", "POST", _VM + "/start", "Start a stopped VM", target="vm",
              lock=True, timeout=300.0),
    Operation("reboot", "POST", _VM + "/reboot",
              "Reboot through the guest (guest agent, then ACPI), falling back to reset",
              target="vm", lock=True, params=("timeout",), timeout=300.0),
    Operation("shutdown", "POST", _VM + "/shutdown",
              "ACPI powerdown, wait up to timeout seconds, then force", target="vm",
              lock=True, params=("timeout",), timeout=300.0),
    Operation("reset", "POST", _VM + "/reset", "Hardware reset (QMP system_reset)",
              target="vm", lock=True),
    Operation("poweroff", "POST", _VM + "/poweroff", "Stop qemu immediately",
              target="vm", lock=True, timeout=120.0),
    Operation("hard_reset", "POST", _VM + "/hard_reset",
              "Kill qemu and start it again", target="vm", lock=True, timeout=300.0),
    Operation("snapshot", "POST", _VM + "/snapshots",
              "Take a live internal qcow2 snapshot", target="vm", lock=True,
              params=("snapshot",), timeout=600.0),
    Operation("snapshots", "GET", _VM + "/snapshots", "List the VM's snapshots",
              target="vm"),
    Operation("events", "GET", _VM + "/events",
              "The VM's events (state changes with reasons, restarts, warnings, "
              "operations), oldest first: the last limit of them (since: only those "
              "after this time, epoch seconds)", target="vm", params=("limit", "since")),
    Operation("console_log", "GET", _VM + "/console/log",
              "The serial console log from byte offset on", target="vm",
              params=("offset", "tail")),
    Operation("console", "GET", _VM + "/console",
              "Attach to the serial console (websocket)", target="vm", stream="console"),
    Operation("tunnel", "GET", _VM + "/tunnel",
              "A TCP stream to the guest's SSH port (websocket)", target="vm",
              stream="ssh"),
    # monitoring (vmagent/monitor/, docs/monitoring.md): scraped by Prometheus, Golovan
    Operation("metrics", "GET", "/metrics",
              "Every VM's signals (link_alive, net_alive, state, resources, restarts) and "
              "the host's, in the Prometheus text format", access_override="metrics",
              text=True, content_type="text/plain; version=0.0.4; charset=utf-8",
              timeout=30.0),
    Operation("unistat", "GET", "/unistat",
              "The same signals as metrics in Golovan's unistat JSON: [[name, value], ...]",
              access_override="metrics", timeout=30.0),
    # the browser (api/links.py, api/ui/): the screen, and links that sign a browser in
    Operation("vnc", "GET", _VM + "/vnc",
              "Attach to the VM's screen: RFB (VNC) over a websocket, as noVNC speaks it",
              target="vm", stream="vnc"),
    Operation("vnc_link", "POST", _VM + "/vnc/link",
              "A short-lived, single-use link that opens the VM's noVNC console in a "
              "browser (for this VM only)", target="vm", params=("ttl",)),
    Operation("ui_link", "POST", "/ui/link",
              "A short-lived, single-use link that signs a browser in to the web UI as "
              "the caller", target="user", params=("ttl",)),
    Operation("image_list", "GET", "/images",
              "Images in the store and catalog entries available to pull", target="image"),
    Operation("image_import", "POST", "/images",
              "Import an image from a file on the agent's host", target="image",
              created=True, timeout=1800.0,
              params=("image", "path", "kernel", "initrd", "append", "sha256",
                      "description")),
    Operation("image_pull", "POST", "/images/{image}/pull",
              "Download a catalog image (or a URL) and verify its digest: a job, bounded by "
              "its deadline (timeout) and a minimum rate; wait=false answers at once",
              target="image", timeout=3600.0, params=("url", "sha256", "timeout", "wait")),
    Operation("image_pull_status", "GET", "/images/{image}/pull",
              "The image's latest pull job: state, bytes done and expected, error, result",
              target="image"),
    Operation("image_pull_cancel", "DELETE", "/images/{image}/pull",
              "Cancel the image's running pull; nothing enters the store",
              target="image"),
    Operation("image_remove", "DELETE", "/images/{image}",
              "Remove an image no VM uses", target="image"),
    # image builds (images/build/jobs.py): a background job, one at a time; poll it
    Operation("image_build", "POST", "/images/{image}/build",
              "Start building an image from its catalog recipe (debootstrap from the "
              "package mirror); returns the job", target="image", params=("replace",)),
    Operation("image_build_status", "GET", "/images/{image}/build",
              "The image's latest build: state, steps with durations, log tail, result",
              target="image"),
    # templates (templates/): a booted guest's saved state; create with template=T
    # warm-starts a clone from it
    Operation("template_create", "POST", "/templates",
              "Boot a VM from an image, save its RAM and device state as a template",
              target="template", created=True, timeout=1320.0,
              params=("template", "image", "cpus", "memory", "disk", "ssh_keys", "admins",
                      "user_data", "timeout")),
    Operation("template_list", "GET", "/templates", "All templates", target="template"),
    Operation("template_show", "GET", "/templates/{template}",
              "One template; while it is being built, its build job", target="template"),
    Operation("template_remove", "DELETE", "/templates/{template}",
              "Remove a template (refused while VMs use it, unless force)",
              target="template", params=("force",)),
    # warm pools (pools/): clones of a template kept restored and paused; create with
    # pool=P takes one
    Operation("pool_create", "POST", "/pools",
              "Keep size clones of a template restored, re-identified and paused (their "
              "guarantees held on the host); refilled after every take",
              target="pool", created=True, params=("pool", "template", "size")),
    Operation("pool_list", "GET", "/pools",
              "All warm pools: template, size, ready members, the last fill error",
              target="pool"),
    Operation("pool_show", "GET", "/pools/{pool}", "One warm pool", target="pool"),
    Operation("pool_remove", "DELETE", "/pools/{pool}",
              "Remove a warm pool and delete its members (VMs taken from it stay)",
              target="pool", timeout=300.0),
    # the key registry (identity/keys.py): whose SSH keys get into VMs
    Operation("key_list", "GET", "/keys", "A person's SSH public keys (default: the "
              "caller's) and where they come from", target="user", params=("user",)),
    Operation("key_add", "POST", "/keys", "Add SSH public keys to a person's registry "
              "entry (default: the caller's)", target="user", created=True,
              params=("user", "keys")),
    Operation("key_remove", "DELETE", "/keys", "Remove a person's SSH public key (by "
              "fingerprint or comment)", target="user", params=("user", "key")),
)

BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}


def get(name: str) -> Operation:
    return BY_NAME[name]


def markdown_table() -> str:
    """The table as docs/api.md shows it (kept in step by tests/test_docs.py; regenerate
    with ``python3 -m vmagent.ops``)."""
    lines = ["| op | request | acts on | who may | lock | client timeout | what |",
             "|---|---|---|---|---|---|---|"]
    for op in OPERATIONS:
        if set(_SPEC) <= set(op.params):     # create, push_config
            params = ", ".join(["spec fields...", *(f"{p}?" for p in op.params
                                                    if p not in _SPEC)])
        else:
            params = ", ".join(f"{p}?" for p in op.params)
        request = f"`{op.method} {op.url_path}`" + (f" `{{{params}}}`" if params else "")
        if op.stream:
            request += f" (websocket: {op.stream})"
        lines.append(f"| `{op.name}` | {request} | {op.target} | {op.access} | "
                     f"{'yes' if op.lock else ''} | {op.timeout:g} s | {op.summary} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
