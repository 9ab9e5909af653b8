"""Image builds as background jobs of the agent (:mod:`vmagent.jobs`): one at a time,
progress by step.

``image_build`` starts a job and returns at once; ``image_build_status`` reports its
steps (with their durations), the tail of the build log and, at the end, the image or
which step failed. A build lives in ``STATE/builds/NAME/``: ``status.json`` (rewritten
at every step), ``build.log``, ``recipe.json`` and ``work/`` (the disk being built,
removed at the end, success or not). Downloaded packages are kept in
``STATE/cache/build/`` (or ``$VMAGENT_BUILD_CACHE``) for the next build. The finished
image enters the store by one rename (:meth:`ImageStore.add_built`), so a failed build
leaves nothing in the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from vmagent.errors import BadRequest, Conflict, ImageError
from vmagent.images.build import builder
from vmagent.images.build.recipes import host_mirror
from vmagent.images.catalog import Catalog
from vmagent.images.store import ImageStore
from vmagent.jobs import Job, Jobs
from vmagent.spec import check_image_name

log = logging.getLogger(__name__)

KIND = "image_build"
STEPS = (*builder.STEPS, "import")
LOG_FILE = "build.log"


def _upgrade_v0(doc: dict[str, Any]) -> dict[str, Any]:
    """status.json of vmagent 0.1 (before jobs.py): its own keys."""
    return {"kind": KIND, "name": doc["image"], "all_steps": list(STEPS),
            "log": doc.get("log"), "extra": {"image": doc["image"],
                                             "recipe": doc.get("recipe") or {}},
            "state": doc["state"], "step": doc.get("step"),
            "steps": doc.get("raw_steps") or [], "started": doc["started"],
            "finished": doc.get("finished"), "error": doc.get("error"),
            "failed_step": doc.get("failed_step"), "result": doc.get("result")}


class Builds:
    """The image builds of one agent (``state_dir``); at most one runs at a time."""

    def __init__(self, state_dir: Path, images: ImageStore, catalog: Catalog,
                 jobs: Jobs) -> None:
        self.root = state_dir / "builds"
        self.cache = Path(os.environ.get("VMAGENT_BUILD_CACHE") or
                          state_dir / "cache" / "build")
        self.images = images
        self.catalog = catalog
        self.jobs = jobs
        self.logs: dict[str, builder.Log] = {}      # the open log of a running build
        self.root.mkdir(parents=True, exist_ok=True)
        jobs.recover(KIND, self.root, self._interrupted, upgrades={0: _upgrade_v0})

    @staticmethod
    def _interrupted(job: Job) -> None:
        """A build a stopped agent left: its mounts and loop devices are released and
        its work directory removed."""
        assert job.directory is not None
        lg = builder.Log(job.directory / LOG_FILE)
        try:
            builder.release_stale(job.directory / "work", lg)
        finally:
            lg.close()
        shutil.rmtree(job.directory / "work", ignore_errors=True)

    def status(self, image: str) -> dict[str, Any]:
        check_image_name(image)
        return self.jobs.status(KIND, image, f"no build of image {image!r} (start one "
                                f"with 'vmctl image build {image}')")

    async def start(self, image: str, replace: bool, users: Callable[[], list[str]]) -> dict:
        check_image_name(image)
        entry = self.catalog.get(image)
        if entry.recipe is None:
            raise BadRequest(f"image {image!r} has no [build] recipe in the catalog "
                             f"({entry.file}); it can only be pulled", image=image)
        running = self.jobs.running(KIND)
        if running:
            if running[0].name == image:
                return running[0].to_json()        # follow the running build
            raise Conflict(f"a build of {running[0].name!r} is running (step "
                           f"{running[0].step}); one build at a time",
                           image=running[0].name)
        if self.images.exists(image):
            if not replace:
                raise Conflict(f"image {image!r} is already in the store; remove it "
                               "first or rebuild with replace", image=image)
            if users():
                raise Conflict(f"image {image!r} is used by {', '.join(sorted(users()))}; "
                               "it cannot be replaced", image=image)
        recipe = host_mirror(entry.recipe)
        directory = self.root / image
        shutil.rmtree(directory, ignore_errors=True)
        (directory / "work").mkdir(parents=True)
        (directory / "recipe.json").write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
        job = Job(KIND, image, steps=STEPS, directory=directory,
                  log_path=directory / LOG_FILE,
                  extra={"image": image, "recipe": recipe.to_json()})
        # an entry that is also downloadable describes the download, not this build
        description = (f"{recipe.distribution} {recipe.suite} built from {recipe.mirror}"
                       if entry.downloadable or not entry.description else entry.description)
        job.step = builder.STEPS[0]     # the builder reports each step as it starts
        self.jobs.start(job, lambda job: self._run(job, recipe, description, replace,
                                                   users))
        return job.to_json()

    async def _run(self, job: Job, recipe: Any, description: str, replace: bool,
                   users: Callable[[], list[str]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        assert job.directory is not None and job.log_path is not None
        lg = self.logs[job.name] = builder.Log(job.log_path)
        work = job.directory / "work"

        def on_step(step: str) -> None:
            loop.call_soon_threadsafe(job.begin, step)

        try:
            b = builder.Builder(recipe, work, self.cache, lg, on_step)
            thread = asyncio.ensure_future(asyncio.to_thread(b.run))
            try:
                disk = await asyncio.shield(thread)
            except asyncio.CancelledError:
                lg.cancel()              # the builder stops and releases its mounts
                await asyncio.wait([thread])
                if not thread.cancelled():
                    thread.exception()   # retrieved: it is the cancellation we asked for
                raise
            job.begin("import")
            if replace and users():
                raise builder.StepFailed("import", f"image {job.name!r} is now used by "
                                         f"{', '.join(users())}; not replaced")
            img = await self.images.add_built(
                job.name, disk, {"recipe.json": job.directory / "recipe.json",
                                 LOG_FILE: job.log_path},
                description=description,
                source={"kind": "build", "recipe": job.name, "mirror": recipe.mirror,
                        "suite": recipe.suite, "distribution": recipe.distribution,
                        "build_seconds": round(time.time() - job.started, 1)},
                replace=replace)
            lg.write(f"\n== done: {img.name} {img.sha256} ({img.actual_size} bytes)\n")
            return img.to_json()
        except builder.StepFailed as exc:
            job.fail(exc.message, exc.step)
        except (ImageError, Conflict, OSError) as exc:
            job.fail(getattr(exc, "message", None) or str(exc))
        finally:
            if not job.running:
                lg.write(f"\n== FAILED at step {job.failed_step}: {job.error}\n")
            if not builder.mounts_under(work):
                shutil.rmtree(work, ignore_errors=True)
            else:
                log.error("build of %s: mounts remain under %s; not removed", job.name, work)
            lg.close()
            self.logs.pop(job.name, None)
            log.info("build of %s: %s in %.0fs", job.name, job.state.value,
                     time.time() - job.started)
        return job.result or {}

    async def close(self) -> None:
        """Stop a running build (agent shutdown): its command is killed at once."""
        for lg in list(self.logs.values()):
            lg.cancel()
