"""The permission check: a guard (:mod:`vmagent.api.dispatch`) that decides every
request from its operation's row (``Operation.access``, derived from what the row acts
on), so that no operation can skip it:

* ``any``: every authenticated caller;
* ``owner``: the named VM's owner and admins, and operators (a VM created before
  ownership existed has no owner: it is the operators');
* ``self``: a caller for themself (the ``user`` parameter absent or theirs), operators
  for anyone;
* ``operator``: operators only;
* ``metrics``: operators and metrics tokens. A caller of role ``metrics`` (a scraper's
  token) may call these rows and nothing else.

Anyone else gets 403 with a message naming the target and the caller.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Callable

from vmagent.api.dispatch import Guard, target_of
from vmagent.context import Caller, RequestContext, Role
from vmagent.errors import Forbidden
from vmagent.ops import Operation

# (owner, admins) of a VM by name; None: no such VM (the handler answers 404)
People = Callable[[str], "tuple[str | None, list[str]] | None"]


def may_operate(caller: Caller, owner: str | None, admins: list[str]) -> bool:
    return caller.is_operator or (owner is not None and caller.user == owner) \
        or caller.user in admins


def check(op: Operation, ctx: RequestContext, params: dict[str, Any],
          people: People) -> None:
    caller = ctx.caller
    level = op.access
    who = f"{caller.user} ({caller.role.value})"
    if caller.role == Role.METRICS:
        if level != "metrics":
            raise Forbidden(f"{who} is a metrics token: it may read the metrics, not "
                            f"{op.name}", operation=op.name, user=caller.user)
        return
    if caller.is_operator or level == "any":
        return
    if level == "metrics":
        raise Forbidden(f"{op.name} is for operators and metrics tokens; {who} may not",
                        operation=op.name, user=caller.user)
    if level == "operator":
        raise Forbidden(f"{op.name} is for operators; {who} may not", operation=op.name,
                        user=caller.user)
    if level == "self":
        user = params.get("user") or caller.user
        if user != caller.user:
            raise Forbidden(f"{who} may not {op.name} for {user}: only for themself",
                            operation=op.name, user=caller.user)
        return
    name = target_of(op, params)
    found = people(name) if name is not None else None
    if found is None:
        return
    owner, admins = found
    if not may_operate(caller, owner, admins):
        raise Forbidden(f"VM {name} belongs to {owner or 'the operators'}: "
                        f"{who} may not {op.name} it", vm=name, operation=op.name,
                        user=caller.user)


def access_guard(people: People) -> Guard:
    @contextlib.asynccontextmanager
    async def guard(op: Operation, ctx: RequestContext,
                    params: dict[str, Any]) -> AsyncIterator[None]:
        check(op, ctx, params, people)
        yield
    return guard
