"""The web UI's HTML: one layout and the pages, rendered on the server from what the
operations answered. Every value is escaped here; the scripts (``static/*.js``) only
fetch fragments rendered by these same functions, or set text.
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any, Iterable

from vmagent.api.ui import views
from vmagent.api.ui.sessions import CSRF_FIELD, Session
from vmagent.spec import SEGMENTS

STATIC = "/ui/static"


def e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, session: Session | None = None, *,
         scripts: Iterable[str] = (), styles: Iterable[str] = (),
         classic: Iterable[str] = (), nav: bool = True) -> str:
    """A whole page; ``scripts`` are ES modules, ``classic`` plain scripts run before
    them (both deferred, in order)."""
    head = [f'<link rel="stylesheet" href="{STATIC}/app/ui.css">']
    head += [f'<link rel="stylesheet" href="{e(s)}">' for s in styles]
    head += [f'<script defer src="{e(s)}"></script>' for s in classic]
    head += [f'<script type="module" src="{e(s)}"></script>' for s in scripts]
    if session is not None:
        head.append(f'<meta name="csrf-token" content="{e(session.csrf)}">')
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} · vmagent</title><link rel="icon" href="data:,">'
            f'{"".join(head)}</head>'
            f'<body>{header(session) if nav else ""}'
            f'<main id="main">{body}</main></body></html>\n')


def header(session: Session | None) -> str:
    if session is None:
        return '<header><span class="brand">vmagent</span></header>'
    who = f'{e(session.caller.user)} <span class="role">({e(session.caller.role.value)})</span>'
    if session.vnc_only is not None:
        return f'<header><span class="brand">vmagent</span><span class="who">{who}</span></header>'
    return (f'<header><a class="brand" href="/ui/">vmagent</a><nav aria-label="main">'
            f'<a href="/ui/">VMs</a><a href="/ui/new">New VM</a></nav>'
            f'<span class="who">{who}</span>'
            f'<form method="post" action="/ui/logout" class="inline">{csrf_field(session)}'
            f'<button class="link">Sign out</button></form></header>')


def csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="{CSRF_FIELD}" value="{e(session.csrf)}">'


def message(text: str | None, kind: str = "error") -> str:
    if not text:
        return ""
    role = "alert" if kind == "error" else "status"
    return f'<p class="msg {kind}" role="{role}">{e(text)}</p>'


# --- sign in, errors ---------------------------------------------------------------------

def login(csrf: str, next_url: str = "/ui/", error: str | None = None) -> str:
    body = (f'<h1>Sign in</h1>{message(error)}'
            f'<form method="post" action="/ui/login" class="card narrow">'
            f'<input type="hidden" name="{CSRF_FIELD}" value="{e(csrf)}">'
            f'<input type="hidden" name="next" value="{e(next_url)}">'
            f'<label for="token">API token</label>'
            f'<input id="token" name="token" type="password" autocomplete="off" required '
            f'autofocus spellcheck="false">'
            f'<button type="submit">Sign in</button></form>'
            f'<p class="hint">On the agent\'s host, <code>vmctl ui</code> prints a link that '
            f'signs you in without a token; an operator makes tokens with '
            f'<code>vmagent token add NAME</code>.</p>')
    return page("Sign in", body)


def error(status: int, text: str, session: Session | None = None) -> str:
    title = {401: "Not signed in", 403: "Not allowed", 404: "Not found",
             409: "Not now"}.get(status, "Error")
    back = '<p><a href="/ui/">Back to the list</a></p>' if session and \
        session.vnc_only is None else ""
    return page(title, f'<h1>{e(title)}</h1>{message(text)}{back}', session)


# --- the list ----------------------------------------------------------------------------

def _alive(ok: bool, what: str) -> str:
    word = "up" if ok else "down"
    return f'<span class="dot {word}" aria-hidden="true"></span><span>{what} {word}</span>'


def rows(items: list[dict]) -> str:
    if not items:
        return ('<tr><td colspan="6" class="empty">No VMs yet: '
                '<a href="/ui/new">create one</a>.</td></tr>')
    out = []
    for r in items:
        name = e(r["name"])
        reason = f'<div class="reason">{e(r["reason"])}</div>' if r.get("reason") else ""
        out.append(
            f'<tr data-vm="{name}"><th scope="row"><a href="/ui/vms/{name}">{name}</a></th>'
            f'<td><span class="state s-{e(r["shown"])}" data-state>{e(r["shown"])}</span>'
            f'{reason}</td>'
            f'<td class="alive">{_alive(r["link_alive"], "link")}'
            f'{_alive(r["net_alive"], "net")}</td>'
            f'<td>{e(r["owner"] or "operators")}</td><td>{e(r["resources"])}</td>'
            f'<td><code>{e(r["ssh"])}</code></td></tr>')
    return "".join(out)


def host_line(host: dict) -> str:
    cap = host.get("capacity") or {}
    return (f'<p class="host">Host <strong>{e(host.get("hostname") or "")}</strong>: '
            f'{e(cap.get("cpus", "-"))} CPUs · {views.size(cap.get("memory"))} RAM · '
            f'{views.size(cap.get("disk_free"))} disk free · accel '
            f'{e(host.get("accel") or "-")}</p>')


def vm_list(session: Session, items: list[dict], host: dict) -> str:
    body = (f'<h1>VMs</h1>{host_line(host)}'
            f'<div class="table"><table><caption class="sr">Your VMs</caption><thead><tr>'
            f'<th scope="col">Name</th><th scope="col">State</th>'
            f'<th scope="col">Alive</th><th scope="col">Owner</th>'
            f'<th scope="col">Resources</th><th scope="col">SSH</th></tr></thead>'
            f'<tbody id="vms" aria-live="polite">{rows(items)}</tbody></table></div>'
            f'<p><a class="button" href="/ui/new">New VM</a></p>')
    return page("VMs", body, session, scripts=[f"{STATIC}/app/list.js"])


# --- one VM ------------------------------------------------------------------------------

ACTIONS = (("start", "Start", None), ("shutdown", "Stop", None),
           ("reboot", "Reboot", None),
           ("reset", "Reset", "Reset {name}? The guest restarts at once, like a reset "
            "button: unsaved data in it is lost."),
           ("poweroff", "Power off", "Power {name} off? qemu stops at once, like pulling "
            "the plug."))


def _dl(pairs: Iterable[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def status_fragment(st: dict, row: dict) -> str:
    on_host = views.ssh_on_host(st)
    pairs = [("State", f'<span class="state s-{e(row["shown"])}" id="state">'
                       f'{e(row["shown"])}</span>'
                       + (f' <span class="busy">({e(row["busy"])} running)</span>'
                          if row.get("busy") else "")),
             ("Reason", e(st.get("reason") or "-")),
             ("Alive", _alive(row["link_alive"], "link") + _alive(row["net_alive"], "net")),
             ("Owner", e(st.get("owner") or "operators")),
             ("Accounts", e(", ".join(st.get("accounts") or []) or "-")),
             ("SSH", f'<code>{e(views.ssh_command(st))}</code>'
                     + (f'<br><code>{e(on_host)}</code> <span class="hint">(on the host)'
                        f'</span>' if on_host else "")),
             ("Accel", e(st.get("accel") or "-")), ("Created", e(st.get("created") or "-"))]
    return _dl(pairs)


def spec_fragment(spec: dict) -> str:
    pairs = [("Image", e(spec.get("image"))), ("CPUs", e(spec.get("cpus"))),
             ("Memory", e(views.size(spec.get("memory")))),
             ("Disk", e(views.size(spec.get("disk")))),
             ("Segment", e(spec.get("segment") or "-")),
             ("Admins", e(", ".join(spec.get("admins") or []) or "-")),
             ("CPU guarantee / limit", e(f'{spec.get("cpu_guarantee") or "-"} / '
                                         f'{spec.get("cpu_limit") or "-"}')),
             ("RAM guarantee / limit", e(f'{views.size(spec.get("ram_guarantee"))} / '
                                         f'{views.size(spec.get("ram_limit"))}'))]
    return _dl(pairs)


def events_fragment(events: list[dict]) -> str:
    if not events:
        return '<p class="empty">No events.</p>'
    items = []
    for ev in reversed(events[-50:]):
        when = _when(ev.get("time"))
        rest = {k: v for k, v in ev.items() if k not in ("time", "type")}
        what = f'{rest.pop("from")} → {rest.pop("to")}' if {"from", "to"} <= set(rest) \
            else ""
        extra = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                         for k, v in sorted(rest.items()) if v not in (None, ""))
        items.append(f'<li><time>{e(when)}</time> <strong>{e(ev.get("type"))}</strong> '
                     f'{e(what)} <span class="hint">{e(extra)}</span></li>')
    return f'<ol class="events">{"".join(items)}</ol>'


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def snapshots_fragment(snaps: list[dict] | None, why: str | None = None) -> str:
    if snaps is None:
        return f'<p class="empty">{e(why or "unknown")}</p>'
    if not snaps:
        return '<p class="empty">No snapshots.</p>'
    body = "".join(f'<tr><td>{e(s.get("name"))}</td><td>{e(_when(s.get("date")))}</td>'
                   f'<td>{e(views.size(s.get("vm_state_size")))}</td></tr>' for s in snaps)
    return (f'<table><thead><tr><th scope="col">Name</th><th scope="col">Taken</th>'
            f'<th scope="col">RAM state</th></tr></thead><tbody>{body}</tbody></table>')


def _action(session: Session, name: str, op: str, label: str, confirm: str | None) -> str:
    data = f' data-confirm="{e(confirm.format(name=name))}"' if confirm else ""
    return (f'<form method="post" action="/ui/vms/{e(name)}/op" data-op="{op}"{data}>'
            f'{csrf_field(session)}<input type="hidden" name="op" value="{op}">'
            f'<button type="submit" id="do-{op}">{e(label)}</button></form>')


def vm_page(session: Session, st: dict, row: dict, events: list[dict],
            snaps: list[dict] | None, snaps_why: str | None) -> str:
    name = e(st["name"])
    actions = "".join(_action(session, st["name"], *a) for a in ACTIONS)
    actions += (f'<form method="post" action="/ui/vms/{name}/op" data-op="snapshot">'
                f'{csrf_field(session)}<input type="hidden" name="op" value="snapshot">'
                f'<label for="snapname" class="sr">Snapshot name</label>'
                f'<input id="snapname" name="snapshot" placeholder="snapshot name '
                f'(optional)" pattern="[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}">'
                f'<button type="submit" id="do-snapshot">Snapshot</button></form>')
    body = (f'<h1>{name}</h1>'
            f'<div class="actions" role="group" aria-label="operations">{actions}'
            f'<a class="button" id="open-console" href="/ui/vms/{name}/console">Console</a>'
            f'<a class="button" id="open-vnc" href="/ui/vms/{name}/vnc">VNC</a></div>'
            f'<p id="result" class="msg" role="status" aria-live="polite"></p>'
            f'<div class="cols"><section><h2>Status</h2><div id="status" data-vm="{name}">'
            f'{status_fragment(st, row)}</div></section>'
            f'<section><h2>Spec</h2><div id="spec">{spec_fragment(st.get("spec") or {})}'
            f'</div></section></div>'
            f'<section><h2>Snapshots</h2><div id="snapshots">'
            f'{snapshots_fragment(snaps, snaps_why)}</div></section>'
            f'<section><h2>Events</h2><div id="events">{events_fragment(events)}</div>'
            f'</section>'
            f'<section class="danger"><h2>Delete</h2>'
            f'<form method="post" action="/ui/vms/{name}/op" data-op="delete">'
            f'{csrf_field(session)}<input type="hidden" name="op" value="delete">'
            f'<label><input type="checkbox" name="confirm" value="yes" required '
            f'id="confirm-delete"> Yes, delete {name} and its disk</label> '
            f'<button type="submit" id="do-delete" class="danger">Delete</button>'
            f'</form></section>')
    return page(st["name"], body, session, scripts=[f"{STATIC}/app/vm.js"])


# --- create ------------------------------------------------------------------------------

def _options(values: Iterable[str], chosen: str | None) -> str:
    return "".join(f'<option{" selected" if v == chosen else ""}>{e(v)}</option>'
                   for v in values)


def new_vm(session: Session, images: list[str], templates: list[str],
           form: dict[str, str] | None = None, error: str | None = None) -> str:
    f = form or {}
    source = f.get("source") or ("template" if templates and not images else "image")

    def field(key: str, label: str, hint: str = "", **attrs: str) -> str:
        extra = "".join(f' {k.replace("_", "-")}="{e(v)}"' for k, v in attrs.items())
        hint_html = f'<small id="{key}-hint">{e(hint)}</small>' if hint else ""
        described = f' aria-describedby="{key}-hint"' if hint else ""
        return (f'<label for="{key}">{e(label)}</label><input id="{key}" name="{key}" '
                f'value="{e(f.get(key, ""))}"{described}{extra}>{hint_html}')

    def radio(value: str, label: str) -> str:
        checked = " checked" if source == value else ""
        return (f'<label class="inline"><input type="radio" name="source" value="{value}"'
                f'{checked}> {label}</label>')

    body = (f'<h1>New VM</h1>{message(error)}<div class="create">'
            f'<form method="post" action="/ui/new" id="create" class="card">'
            f'{csrf_field(session)}'
            + field("name", "Name", "letters, digits and '-'", required="required",
                    pattern="[a-z0-9][a-z0-9-]{0,62}", autocomplete="off")
            + f'<fieldset><legend>Boot from</legend>{radio("image", "an image")}'
            f'{radio("template", "a template (warm start, seconds)")}'
            f'<label for="image">Image</label><select id="image" name="image">'
            f'{_options(images, f.get("image"))}</select>'
            f'<label for="template">Template</label><select id="template" name="template">'
            f'{_options(templates, f.get("template"))}</select></fieldset>'
            + '<div class="row3"><div>'
            + field("cpus", "CPUs", "default: the image's", type="number", min="1",
                    max="64")
            + '</div><div>' + field("memory", "Memory", "e.g. 2G, 512M", placeholder="2G")
            + '</div><div>' + field("disk", "Disk", "at least the image's",
                                    placeholder="20G") + '</div></div>'
            + f'<label for="segment">Segment</label><select id="segment" name="segment">'
            f'<option value="">default of the agent</option>'
            f'{_options(SEGMENTS, f.get("segment"))}</select>'
            + field("admins", "Admins", "people who get an account with sudo, "
                    "separated by spaces or commas", autocomplete="off")
            + f'<label for="ssh_key">SSH public key</label><textarea id="ssh_key" '
            f'name="ssh_key" rows="2" aria-describedby="ssh_key-hint" spellcheck="false">'
            f'{e(f.get("ssh_key", ""))}</textarea><small id="ssh_key-hint">optional: '
            f'the keys you added with <code>vmctl key add</code> are used anyway</small>'
            f'<button type="submit" id="create-submit">Create</button></form>'
            f'<section id="progress" hidden><h2>Booting <span id="p-name"></span></h2>'
            f'<ol id="phases" class="phases">'
            + "".join(f'<li data-phase="{k}"><span class="mark" aria-hidden="true">·</span>'
                      f' {e(label)} <span class="t"></span></li>' for k, label in views.PHASES)
            + '</ol><p class="hint">console: <code id="p-line"></code></p>'
            '<p id="p-result" role="status" aria-live="polite"></p></section></div>')
    return page("New VM", body, session, scripts=[f"{STATIC}/app/create.js"])


# --- consoles ----------------------------------------------------------------------------

def console(session: Session, name: str) -> str:
    body = (f'<h1>Console of <a href="/ui/vms/{e(name)}">{e(name)}</a></h1>'
            f'<p class="hint">The serial console: what you type goes to the guest. '
            f'<span id="term-status" role="status" aria-live="polite">connecting…</span></p>'
            f'<div id="term" class="term" data-vm="{e(name)}" '
            f'aria-label="serial console of {e(name)}"></div>')
    return page(f"console {name}", body, session,
                classic=[f"{STATIC}/xterm/xterm.js", f"{STATIC}/xterm/addon-fit.js"],
                scripts=[f"{STATIC}/app/console.js"],
                styles=[f"{STATIC}/xterm/xterm.css"])


def vnc(session: Session, name: str) -> str:
    title = e(name) if session.vnc_only else f'<a href="/ui/vms/{e(name)}">{e(name)}</a>'
    body = (f'<h1>Screen of {title}</h1>'
            f'<div class="actions"><span id="vnc-status" role="status" aria-live="polite">'
            f'connecting…</span><button type="button" id="vnc-cad">Send Ctrl-Alt-Del</button>'
            f'<label class="inline"><input type="checkbox" id="vnc-scale" checked> fit to '
            f'window</label></div>'
            f'<div id="screen" class="screen" data-vm="{e(name)}"></div>')
    return page(f"screen {name}", body, session, scripts=[f"{STATIC}/app/vnc.js"])
