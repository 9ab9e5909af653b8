"""The key operations: ``key_list``, ``key_add``, ``key_remove`` on the key registry
(:mod:`vmagent.identity.keys`). A user manages their own entry; operators anyone's
(the permission guard decides from the row's ``self`` access)."""

from __future__ import annotations

from typing import Any

from vmagent.context import RequestContext
from vmagent.errors import BadRequest
from vmagent.identity.keys import KeyRegistry, check_user, describe, parse_keys


class KeyService:
    def __init__(self, registry: KeyRegistry) -> None:
        self.registry = registry

    @staticmethod
    def _user(ctx: RequestContext, user: Any) -> str:
        return check_user(user or ctx.caller.user)

    async def list(self, ctx: RequestContext, user: Any = None) -> dict:
        user = self._user(ctx, user)
        found = await self.registry.resolve(user)
        return {"user": user, "source": found.source, "warning": found.warning,
                "keys": [describe(k, found.source or "") for k in found.keys],
                "keys_dir": [describe(k, self.registry.dir.name)
                             for k in self.registry.dir.current(user)]}

    async def add(self, ctx: RequestContext, user: Any = None, keys: Any = None) -> dict:
        user = self._user(ctx, user)
        if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            keys = "\n".join(keys)
        if not isinstance(keys, str) or not keys.strip():
            raise BadRequest("keys: one or more OpenSSH public keys (the lines of a .pub "
                             "or authorized_keys file)")
        new = parse_keys(keys, strict=True)
        have = self.registry.dir.add(user, new)
        return {"user": user, "added": [describe(k, self.registry.dir.name) for k in new],
                "keys": [describe(k, self.registry.dir.name) for k in have]}

    async def remove(self, ctx: RequestContext, user: Any = None, key: Any = None) -> dict:
        user = self._user(ctx, user)
        if not isinstance(key, str) or not key.strip():
            raise BadRequest("key: the fingerprint (SHA256:...), the comment or the key "
                             "to remove")
        gone = self.registry.dir.remove(user, key.strip())
        return {"user": user, "removed": [describe(k, self.registry.dir.name)
                                          for k in gone]}
