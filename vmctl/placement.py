"""The fleet: the hosts of the config file, asked in parallel.

When no host is pinned (no ``--host``, no ``$VMCTL_AGENT``) and the config file has
several ``[hosts.NAME]``, vmctl works on all of them:

- ``create`` places the VM: it asks every host for its capacity (``host``) and whether a
  VM of that name is there (``status``), all at once with a short timeout (an
  unreachable host is skipped and said), sizes the request with each host's own rules,
  ranks the hosts that serve the request's segment and have room by the score of
  :mod:`vmagent.alloc.placement` (best fit on guarantees, ties by fewer VMs) and creates
  on the best one; a host that refuses (another client was faster) hands it to the next.
- ``list`` lists every host's VMs with a host column;
- a command on one VM finds the host that has it.

The agents stay the authority: what vmctl computes here is a choice of where to ask,
never a reservation (docs/allocation.md, docs/scaling.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vmagent.errors import VMAgentError
from vmagent.spec import VMSpec

from .errors import AgentError, CLIError

# the ranking (vmagent.alloc) and the thread pool are imported where a create is placed
# or several hosts are asked: `vmctl list` on one agent needs neither (start-up)
if TYPE_CHECKING:                      # pragma: no cover
    from vmagent.alloc.placement import Option

    from .address import Target
    from .config import Config
    from .output import Output


class App(Protocol):
    """What the fleet needs of the command's :class:`vmctl.app.App`."""

    host: str | None
    local: bool
    config: Config
    out: Output

    def use(self, target: Target) -> None: ...

    def call(self, op: str, **params: Any) -> dict: ...

PROBE_TIMEOUT = float(os.environ.get("VMCTL_PLACEMENT_TIMEOUT", "3"))
# an agent that refuses with one of these moves the request on to the next host
MOVE_ON = ("capacity", "segment", "gpus")


@dataclass
class Probe:
    """One host's answers (or why it gave none)."""

    name: str
    target: Target | None = None
    answers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


def fleet(app: App) -> list[str] | None:
    """The hosts to work on together, or None when one agent is pinned (``--host``,
    ``--local``, ``$VMCTL_AGENT``) or fewer than two hosts are configured."""
    if app.host or app.local or os.environ.get("VMCTL_AGENT"):
        return None
    hosts = sorted(app.config.hosts)
    return hosts if len(hosts) >= 2 else None


def probe(app: App, names: list[str], calls: dict[str, dict[str, Any]],
          timeout: float = PROBE_TIMEOUT) -> list[Probe]:
    """Make ``calls`` ({key: {"op", params...}}) on every host at once. A host that
    does not answer within ``timeout`` (or cannot be reached) gets its error; an agent
    error of one call is its answer (an :class:`AgentError`)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import address
    from .client import AgentClient

    def one(name: str) -> Probe:
        p = Probe(name)
        try:
            p.target = address.resolve(name, app.config)
            client = AgentClient(p.target, timeout=timeout)
            try:
                for key, call in calls.items():
                    params = dict(call)
                    op = params.pop("op")
                    try:
                        p.answers[key] = client.call(op, **params)
                    except AgentError as e:
                        if e.code in ("unauthorized",):
                            raise
                        p.answers[key] = e
            finally:
                client.close()
        except CLIError as e:
            p.error = e.message
        return p
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(names)))) as pool:
        return list(pool.map(one, names))


@dataclass
class Decision:
    """Where a request goes: the hosts ranked, those that could not be asked."""

    name: str
    options: list[Option]
    unreachable: list[Probe]
    targets: dict[str, Target]

    @property
    def fitting(self) -> list[Option]:
        return [o for o in self.options if o.fits]

    def to_json(self) -> dict[str, Any]:
        fit = self.fitting
        return {"chosen": fit[0].host if fit else None,
                "score": "best fit on guarantees: 1 - mean of the CPU and RAM shares "
                         "left free after placing; ties by fewer VMs, then name",
                "hosts": [o.to_json() for o in self.options],
                "unreachable": [{"host": p.name, "error": p.error}
                                for p in self.unreachable]}

    def lines(self) -> list[str]:
        """For people: one line per host, the best first."""
        out = []
        for o in self.options:
            if o.fits:
                out.append(f"  {o.host}: score {o.score:.3f}, {o.vms} VM(s)")
            else:
                out.append(f"  {o.host}: {o.reason}")
        out += [f"  {p.name}: unreachable, skipped ({p.error})" for p in self.unreachable]
        return out


def decide(app: App, names: list[str], vm: str, params: dict[str, Any]) -> Decision:
    """Ask the hosts and rank them for creating ``vm`` with ``params``."""
    from vmagent.alloc.placement import HostView, Option, rank
    from vmagent.alloc.sizing import demand, size
    calls: dict[str, dict[str, Any]] = {"host": {"op": "host"},
                                        "status": {"op": "status", "name": vm}}
    template = params.get("template")
    if template:
        calls["template"] = {"op": "template_show", "template": template}
    probes = probe(app, names, calls)
    reachable = [p for p in probes if p.reachable]
    for p in reachable:
        if isinstance(p.answers.get("host"), AgentError):
            p.error = p.answers["host"].message
    unreachable = [p for p in probes if not p.reachable]
    reachable = [p for p in reachable if p.reachable]
    for p in reachable:
        st = p.answers.get("status")
        if isinstance(st, dict) or (isinstance(st, AgentError) and st.code == "forbidden"):
            raise CLIError(f"a VM named {vm!r} already exists on {p.name}", "conflict",
                           details={"host": p.name})
    views, wants, segments = [], [], []
    refused: dict[str, str] = {}
    fields = {k: v for k, v in params.items()
              if k in VMSpec.FIELDS and k != "name"}
    for p in reachable:
        view = HostView.from_report(p.name, p.answers["host"])
        tpl = p.answers.get("template")
        want_fields = dict(fields)
        if template:
            if not isinstance(tpl, dict):
                refused[p.name] = (tpl.message if isinstance(tpl, AgentError)
                                   else f"no template {template!r}")
                continue
            want_fields.update(cpus=tpl.get("cpus"), memory=tpl.get("memory"))
        try:
            sized = size(VMSpec.from_dict({"name": vm, **want_fields}), view.rules)
        except VMAgentError as e:
            raise CLIError(e.message, e.code) from None
        views.append(view)
        wants.append(demand(sized))
        segments.append(sized.segment)
    options = rank(wants, segments, views) if views else []
    options += [Option(h, None, 0, why) for h, why in sorted(refused.items())]
    return Decision(vm, options, unreachable,
                    {p.name: p.target for p in reachable if p.target is not None})


def nowhere(decision: Decision, refusals: dict[str, str]) -> CLIError:
    """No host can take it: each host's reason."""
    reasons = []
    for o in decision.options:
        reasons.append(f"{o.host}: {refusals.get(o.host) or o.reason}")
    reasons += [f"{p.name}: unreachable ({p.error})" for p in decision.unreachable]
    return CLIError(f"no host can take VM {decision.name}: " + "; ".join(reasons),
                    "conflict", details={"placement": decision.to_json(),
                                         "refusals": refusals})


def plan(app: App, name: str, params: dict[str, Any]) -> Decision | None:
    """Where ``create`` will ask (None: one host is pinned or configured), said on
    stderr: every host's score or reason, the unreachable ones."""
    names = fleet(app)
    if names is None:
        return None
    decision = decide(app, names, name, params)
    app.out.info(f"placing {name} (hosts of the config, best first):")
    for line in decision.lines():
        app.out.info(line)
    return decision


def create(app: App, name: str, params: dict[str, Any], decision: Decision | None,
           *, dry_run: bool = False) -> tuple[dict, dict | None]:
    """``create`` on the pinned host (``decision`` None: ``(status, None)``), else on
    the best host of ``decision`` that accepts it (``(status, placement)``; the app
    talks to that host from then on). A host refusing for room hands it to the next."""
    if decision is None:
        return app.call("create", name=name, dry_run=dry_run or None, **params), None
    doc = decision.to_json()
    refusals: dict[str, str] = {}
    for option in decision.fitting:
        app.use(decision.targets[option.host])
        try:
            status = app.call("create", name=name, dry_run=dry_run or None, **params)
        except AgentError as e:
            if e.code == "conflict" and (e.details or {}).get("refused") in MOVE_ON:
                refusals[option.host] = e.message
                app.out.info(f"{option.host} refused {name} ({e.message}); trying the "
                             "next host")
                continue
            raise
        doc.update(chosen=option.host, refused=refusals,
                   why=f"best fit (score {option.score:.3f}) of "
                       f"{len(decision.fitting)} host(s) with room"
                       + (f", after {len(refusals)} refusal(s)" if refusals else ""))
        app.out.info(f"{name} {'would go' if dry_run else 'goes'} to {option.host}: "
                     f"{doc['why']}")
        return status, doc
    raise nowhere(decision, refusals)


def locate(app: App, name: str) -> Target | None:
    """The host that has VM ``name`` (None: no fleet). NotFound naming the hosts asked
    when none has it."""
    names = fleet(app)
    if names is None:
        return None
    probes = probe(app, names, {"status": {"op": "status", "name": name}})
    for p in probes:
        st = p.answers.get("status")
        if p.reachable and (isinstance(st, dict) or (isinstance(st, AgentError)
                                                     and st.code != "not_found")):
            return p.target
    asked = ", ".join(p.name for p in probes if p.reachable) or "any host"
    down = [f"{p.name} ({p.error})" for p in probes if not p.reachable]
    raise CLIError(f"no VM named {name!r} on {asked}"
                   + (f"; unreachable: {', '.join(down)}" if down else ""), "not_found")


def list_all(app: App, names: list[str], every: bool) -> tuple[list[dict], list[Probe]]:
    """Every host's VMs, each with its ``host``; and the hosts that did not answer."""
    probes = probe(app, names, {"list": {"op": "list", "all": every or None}},
                   timeout=max(PROBE_TIMEOUT, 10.0))
    vms, down = [], []
    for p in probes:
        answer = p.answers.get("list")
        if not p.reachable or isinstance(answer, AgentError):
            if p.error is None and isinstance(answer, AgentError):
                p.error = answer.message
            down.append(p)
            continue
        vms += [{**vm, "host": p.name} for vm in answer.get("vms", [])]
    return sorted(vms, key=lambda v: (v.get("name", ""), v["host"])), down
