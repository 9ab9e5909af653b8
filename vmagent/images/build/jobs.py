"""Image builds as background jobs of the agent: one at a time, progress by step.

``image_build`` starts a job and returns at once; ``image_build_status`` reports its
steps (with their durations), the tail of the build log and, at the end, the image or
which step failed. A job lives in ``STATE/builds/NAME/``: ``status.json`` (rewritten at
every step), ``build.log``, ``recipe.json`` and ``work/`` (the disk being built,
removed at the end, success or not). Downloaded packages are kept in
``STATE/cache/build/`` (or ``$VMAGENT_BUILD_CACHE``) for the next build. The finished image enters the store by one
rename (:meth:`ImageStore.add_built`), so a failed build leaves nothing in the store.
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

from vmagent.images.build import builder
from vmagent.images.catalog import Catalog
from vmagent.errors import BadRequest, Conflict, ImageError, NotFound
from vmagent.fsutil import atomic_write_json, read_json
from vmagent.images.store import ImageStore
from vmagent.images.build.recipes import host_mirror
from vmagent.spec import check_image_name

log = logging.getLogger(__name__)

TAIL_LINES = 30


class Job:
    def __init__(self, image: str, directory: Path, recipe: dict[str, Any]) -> None:
        self.image = image
        self.directory = directory
        self.recipe = recipe
        self.state = "running"            # running | done | failed
        self.step: str | None = builder.STEPS[0]
        self.steps: list[dict[str, Any]] = []
        self.started = time.time()
        self.finished: float | None = None
        self.error: str | None = None
        self.failed_step: str | None = None
        self.result: dict[str, Any] | None = None
        self.log: builder.Log | None = None
        self.task: asyncio.Task | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "build.log"

    def begin(self, step: str) -> None:
        now = time.time()
        if self.steps and self.steps[-1]["seconds"] is None:
            self.steps[-1]["seconds"] = round(now - self.steps[-1]["started"], 1)
        self.step = step
        if step:
            self.steps.append({"name": step, "started": now, "seconds": None})
        self.save()

    def to_json(self) -> dict[str, Any]:
        end = self.finished or time.time()
        steps = [{"name": s["name"], "seconds": s["seconds"] if s["seconds"] is not None
                  else round(end - s["started"], 1),
                  "state": "failed" if self.failed_step == s["name"] else
                  "running" if s["seconds"] is None and self.state == "running" else "done"}
                 for s in self.steps]
        return {"image": self.image, "state": self.state, "step": self.step,
                "steps": steps, "all_steps": [*builder.STEPS, "import"],
                "started": self.started, "finished": self.finished,
                "seconds": round(end - self.started, 1), "error": self.error,
                "failed_step": self.failed_step, "log": str(self.log_path),
                "log_tail": builder.tail(self.log_path, TAIL_LINES),
                "recipe": self.recipe, "result": self.result}

    def save(self) -> None:
        doc = self.to_json()
        doc.pop("log_tail")
        doc["raw_steps"] = self.steps
        atomic_write_json(self.directory / "status.json", doc)

    @classmethod
    def load(cls, directory: Path) -> "Job":
        doc = read_json(directory / "status.json")
        job = cls(doc["image"], directory, doc.get("recipe") or {})
        job.state, job.step, job.steps = doc["state"], doc.get("step"), doc["raw_steps"]
        job.started, job.finished = doc["started"], doc.get("finished")
        job.error, job.failed_step = doc.get("error"), doc.get("failed_step")
        job.result = doc.get("result")
        return job


class Builds:
    """The build jobs of one agent (``state_dir``); at most one runs at a time."""

    def __init__(self, state_dir: Path, images: ImageStore, catalog: Catalog) -> None:
        self.root = state_dir / "builds"
        self.cache = Path(os.environ.get("VMAGENT_BUILD_CACHE") or
                          state_dir / "cache" / "build")
        self.images = images
        self.catalog = catalog
        self.jobs: dict[str, Job] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Jobs a previous agent left: a running one died with it (its mounts and loop
        devices are released, its work directory removed)."""
        for directory in sorted(self.root.iterdir()):
            if not (directory / "status.json").is_file():
                continue
            try:
                job = Job.load(directory)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable build status in %s: %s", directory, exc)
                continue
            if job.state == "running":
                lg = builder.Log(job.log_path)
                try:
                    builder.release_stale(directory / "work", lg)
                finally:
                    lg.close()
                shutil.rmtree(directory / "work", ignore_errors=True)
                job.state, job.finished = "failed", time.time()
                job.failed_step = job.step
                job.error = f"the agent stopped during step {job.step}"
                job.save()
            self.jobs[job.image] = job

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def status(self, image: str) -> dict[str, Any]:
        check_image_name(image)
        job = self.jobs.get(image)
        if job is None:
            raise NotFound(f"no build of image {image!r} (start one with 'vmctl image "
                           f"build {image}')", image=image)
        return job.to_json()

    async def start(self, image: str, replace: bool, users: Callable[[], list[str]]) -> dict:
        check_image_name(image)
        entry = self.catalog.get(image)
        if entry.recipe is None:
            raise BadRequest(f"image {image!r} has no [build] recipe in the catalog "
                             f"({entry.file}); it can only be pulled", image=image)
        current = self.running()
        if current is not None:
            if current.image == image:
                return current.to_json()           # follow the running build
            raise Conflict(f"a build of {current.image!r} is running (step "
                           f"{current.step}); one build at a time", image=current.image)
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
        job = Job(image, directory, recipe.to_json())
        job.log = builder.Log(job.log_path)
        job.save()
        self.jobs[image] = job
        # an entry that is also downloadable describes the download, not this build
        description = (f"{recipe.distribution} {recipe.suite} built from {recipe.mirror}"
                       if entry.downloadable or not entry.description else entry.description)
        job.task = asyncio.create_task(self._run(job, recipe, description, replace, users))
        return job.to_json()

    async def _run(self, job: Job, recipe: Any, description: str, replace: bool,
                   users: Callable[[], list[str]]) -> None:
        loop = asyncio.get_running_loop()
        lg = job.log
        assert lg is not None

        def on_step(step: str) -> None:
            loop.call_soon_threadsafe(job.begin, step)

        work = job.directory / "work"
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
                raise builder.StepFailed("import", f"image {job.image!r} is now used by "
                                         f"{', '.join(users())}; not replaced")
            img = await self.images.add_built(
                job.image, disk, {"recipe.json": job.directory / "recipe.json",
                                  "build.log": job.log_path},
                description=description,
                source={"kind": "build", "recipe": job.image, "mirror": recipe.mirror,
                        "suite": recipe.suite, "distribution": recipe.distribution,
                        "build_seconds": round(time.time() - job.started, 1)},
                replace=replace)
            job.result = img.to_json()
            job.state = "done"
            lg.write(f"\n== done: {img.name} {img.sha256} ({img.actual_size} bytes)\n")
        except builder.StepFailed as exc:
            job.state, job.failed_step, job.error = "failed", exc.step, exc.message
        except asyncio.CancelledError:
            lg.cancel()
            job.state, job.failed_step = "failed", job.step
            job.error = "the build was cancelled (agent stopping)"
            raise
        except (ImageError, Conflict, OSError) as exc:
            job.state, job.failed_step = "failed", job.step
            job.error = getattr(exc, "message", None) or str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: the job says so, the log has it
            log.exception("build of %s failed", job.image)
            job.state, job.failed_step = "failed", job.step
            job.error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()
            if job.steps and job.steps[-1]["seconds"] is None:
                job.steps[-1]["seconds"] = round(job.finished - job.steps[-1]["started"], 1)
            if job.state == "failed":
                lg.write(f"\n== FAILED at step {job.failed_step}: {job.error}\n")
            if not builder.mounts_under(work):
                shutil.rmtree(work, ignore_errors=True)
            else:
                log.error("build of %s: mounts remain under %s; not removed", job.image, work)
            job.save()
            lg.close()
            log.info("build of %s: %s in %.0fs", job.image, job.state,
                     job.finished - job.started)

    async def close(self) -> None:
        """Cancel a running build (agent shutdown); its cleanup runs to the end."""
        job = self.running()
        if job is not None and job.task is not None:
            if job.log is not None:
                job.log.cancel()
            job.task.cancel()
            try:
                await job.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
