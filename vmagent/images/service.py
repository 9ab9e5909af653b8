"""The image operations: list, import, pull, remove, build and its status. A mixin of
:class:`vmagent.manager.Manager` over its image store (images.py) and build jobs
(buildjobs.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmagent.qemu.accel import choose
from vmagent.errors import BadRequest
from vmagent.spec import parse_flag as _flag

if TYPE_CHECKING:
    from vmagent.manager import Manager


class ImageOps:
    async def op_image_list(self: "Manager") -> dict:
        have = {i.name for i in self.images.list()}
        return {"images": [i.to_json() for i in self.images.list()],
                "catalog": [{**self.images.catalog.get(n).to_json(), "pulled": n in have}
                            for n in self.images.catalog.names()]}

    async def op_image_import(self: "Manager", image: Any = None, path: Any = None,
                              **kw: Any) -> dict:
        if not image or not path:
            raise BadRequest("image (a name) and path (a file on the agent's host) are "
                             "required")
        img = await self.images.import_file(image, path, **kw)
        if (img.kernel and self.accel and not self.accel.probed
                and not self.settings.accel_override):
            # the first kernel on this host: now KVM can be verified
            self.accel = await choose(self.settings.state_dir, [img.kernel],
                                      binary=self.settings.qemu_binary)
        return img.to_json()

    async def op_image_pull(self: "Manager", image: str, url: Any = None,
                            sha256: Any = None) -> dict:
        return (await self.images.pull(image, url=url, sha256=sha256)).to_json()

    async def op_image_remove(self: "Manager", image: str) -> dict:
        await self.images.remove(image, self._image_users(image))
        return {"deleted": image}

    def _image_users(self: "Manager", image: str) -> list[str]:
        users = [n for n, v in self.vms.items() if v.rec.spec.image == image]
        return users + self.templates_of_image(image)

    async def op_image_build(self: "Manager", image: str, replace: Any = False) -> dict:
        """Start baking ``image`` from its catalog recipe (buildjobs.py, builder.py)."""
        return await self.builds.start(image, _flag(replace, "replace"),
                                       lambda: self._image_users(image))

    async def op_image_build_status(self: "Manager", image: str) -> dict:
        return self.builds.status(image)
