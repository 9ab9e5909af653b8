"""The image operations: list, import, pull, remove, build and its status, over the
image store (:mod:`vmagent.images.store`) and the build jobs
(:mod:`vmagent.images.build.jobs`). Who uses an image (VMs, templates) is asked of the
``users`` function the wiring gives (:mod:`vmagent.app`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from vmagent.context import RequestContext
from vmagent.errors import BadRequest
from vmagent.images.build.jobs import Builds
from vmagent.images.files import Reader
from vmagent.images.pulls import Pulls
from vmagent.images.store import ImageStore
from vmagent.qemu.host import QemuHost
from vmagent.spec import parse_flag, parse_timeout

# the VMs and templates that use an image (their names, for messages)
Users = Callable[[str], list[str]]


class ImageService:
    def __init__(self, images: ImageStore, builds: Builds, pulls: Pulls, host: QemuHost,
                 state_dir: Path, users: Users) -> None:
        self.images = images
        self.builds = builds
        self.pulls = pulls
        self.host = host
        self.state_dir = state_dir
        self.users = users

    async def list(self, ctx: RequestContext) -> dict:
        have = {i.name for i in self.images.list()}
        return {"images": [i.to_json() for i in self.images.list()],
                "catalog": [{**self.images.catalog.get(n).to_json(), "pulled": n in have}
                            for n in self.images.catalog.names()]}

    async def import_(self, ctx: RequestContext, image: Any = None, path: Any = None,
                      **kw: Any) -> dict:
        if not image or not path:
            raise BadRequest("image (a name) and path (a file on the agent's host) are "
                             "required")
        img = await self.images.import_file(image, path, reader=Reader.for_caller(ctx.caller),
                                            **kw)
        if img.kernel:
            await self.host.new_kernel(self.state_dir, img.kernel)
        return img.to_json()

    async def pull(self, ctx: RequestContext, image: str, url: Any = None,
                   sha256: Any = None, timeout: Any = None, wait: Any = True) -> dict:
        """Start (or follow) the pull job of ``image``; with ``wait``, answer when it
        ends (the job goes on if the client goes away)."""
        job = self.pulls.start(image, url, sha256,
                               parse_timeout(timeout, self.pulls.limits.deadline,
                                             maximum=24 * 3600))
        if parse_flag(wait, "wait"):
            await asyncio.shield(self.pulls.wait(job))
        return job.to_json()

    async def pull_status(self, ctx: RequestContext, image: str) -> dict:
        return self.pulls.status(image)

    async def pull_cancel(self, ctx: RequestContext, image: str) -> dict:
        return await self.pulls.cancel(image)

    async def remove(self, ctx: RequestContext, image: str) -> dict:
        await self.images.remove(image, self.users(image))
        return {"deleted": image}

    async def build(self, ctx: RequestContext, image: str, replace: Any = False) -> dict:
        """Start baking ``image`` from its catalog recipe."""
        return await self.builds.start(image, parse_flag(replace, "replace"),
                                       lambda: self.users(image))

    async def build_status(self, ctx: RequestContext, image: str) -> dict:
        return self.builds.status(image)
