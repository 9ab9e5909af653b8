"""Image pulls as jobs (:mod:`vmagent.jobs`): a client starts one and may follow it,
cancel it or let it run; the agent bounds it (a deadline and a minimum rate,
:class:`vmagent.images.download.Limits`) whether or not anybody follows. Asking for the
pull of an image that is being pulled follows the running job instead of waiting for
its lock, and a create that needs the image waits for that same job."""

from __future__ import annotations

import asyncio
from typing import Any

from vmagent.errors import ImageError, NotFound
from vmagent.images.download import Limits
from vmagent.images.store import ImageStore
from vmagent.jobs import Job, Jobs
from vmagent.spec import check_image_name

KIND = "image_pull"
STEPS = ("download", "import")


class Pulls:
    def __init__(self, images: ImageStore, jobs: Jobs, limits: Limits = Limits()) -> None:
        self.images = images
        self.jobs = jobs
        self.limits = limits

    def start(self, name: str, url: str | None = None, sha256: str | None = None,
              deadline: float | None = None) -> Job:
        """The running pull of ``name``, or a new one."""
        check_image_name(name)
        job = self.jobs.get(KIND, name)
        if job is not None and job.running:
            return job
        limits = Limits(deadline or self.limits.deadline, self.limits.min_rate,
                        self.limits.window)
        job = Job(KIND, name, steps=STEPS,
                  extra={"image": name, "url": url, "deadline": limits.deadline})

        async def body(job: Job) -> dict[str, Any]:
            job.begin("download")

            def progress(done: int, total: int | None) -> None:
                job.set_progress(done, total)
            img = await self.images.pull(name, url=url, sha256=sha256, progress=progress,
                                         limits=limits)
            job.begin("import")
            return img.to_json()

        return self.jobs.start(job, body)

    async def wait(self, job: Job) -> dict[str, Any]:
        """The job's result once it ends (an error if it failed). Waiting does not
        bind the job: a waiter that gives up leaves it running within its limits."""
        if job.task is not None:
            await asyncio.wait([job.task])
        doc = job.to_json()
        if doc["state"] != "done":
            raise ImageError(f"the pull of {job.name} {doc['state']}: {doc['error']}",
                             image=job.name, job=doc)
        return doc["result"]

    def status(self, name: str) -> dict[str, Any]:
        check_image_name(name)
        return self.jobs.status(KIND, name, f"no pull of image {name!r} (start one with "
                                f"'vmctl image pull {name}')")

    async def cancel(self, name: str) -> dict[str, Any]:
        check_image_name(name)
        job = self.jobs.get(KIND, name)
        if job is None or not job.running or job.task is None:
            raise NotFound(f"no pull of image {name!r} is running", image=name)
        job.task.cancel()
        await asyncio.wait([job.task])
        return job.to_json()
