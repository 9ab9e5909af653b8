"""Long operations of the agent: image builds, template builds (later downloads,
backups, pool refills). One :class:`Job` records its steps with their durations, its
progress, the tail of its log, how it ended and its result; :class:`Jobs` runs them as
tasks (or in the caller's task), keeps them by kind and name, persists them where they
have a directory, and after a restart marks those a stopped agent interrupted.

A job's status document (``Job.to_json``) is what vmctl's progress display follows:
``state`` (running | done | failed | cancelled), ``step``, ``steps`` (name, state,
seconds), ``all_steps``, ``seconds``, ``error``, ``failed_step``, ``log_tail``,
``progress`` ({done, total} bytes) and ``result``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from vmagent.errors import NotFound, VMAgentError, is_no_space
from vmagent.fsutil import FormatError, read_record, tail_lines, write_record

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
FORMAT = 1
TAIL_LINES = 30
KEEP_FINISHED = 60.0       # seconds a finished job without a directory stays visible


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Job:
    def __init__(self, kind: str, name: str, *, steps: Sequence[str] = (),
                 directory: Path | None = None, log_path: Path | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.name = name
        self.all_steps = list(steps)
        self.directory = directory           # where status.json is kept (None: memory)
        self.log_path = log_path
        self.extra = dict(extra or {})       # kind-specific fields of the status
        self.state = JobState.RUNNING
        self.step: str | None = None
        self.steps: list[dict[str, Any]] = []   # {name, started, seconds (None: running)}
        self.started = time.time()
        self.finished: float | None = None
        self.error: str | None = None
        self.failed_step: str | None = None
        self.result: dict[str, Any] | None = None
        self.progress: dict[str, Any] | None = None
        self.task: asyncio.Task | None = None
        self._kept_tail: str | None = None   # the log's tail, kept when the log goes

    @property
    def running(self) -> bool:
        return self.state == JobState.RUNNING

    # --- what happens -----------------------------------------------------------------

    def begin(self, step: str) -> None:
        """The next step starts (the one before ends)."""
        self._end_step()
        self.step = step
        self.steps.append({"name": step, "started": time.time(), "seconds": None})
        self.save()

    def set_progress(self, done: int, total: int | None = None) -> None:
        self.progress = {"done": done, "total": total}

    def set_log(self, path: Path | None) -> None:
        self.log_path = path

    def keep_tail(self) -> None:
        """Remember the log's tail now (its file is about to be removed)."""
        self._kept_tail = self._read_tail()

    def succeed(self, result: dict[str, Any] | None = None) -> None:
        self._finish(JobState.DONE)
        self.result = result

    def fail(self, error: str, step: str | None = None) -> None:
        """The job failed (the first failure counts) at ``step`` (default: the current)."""
        if not self.running:
            return
        if self._kept_tail is None:
            self.keep_tail()
        self.failed_step = step or self.step
        self.error = error
        self._finish(JobState.FAILED)

    def cancel(self, reason: str) -> None:
        if not self.running:
            return
        self.failed_step, self.error = self.step, reason
        self._finish(JobState.CANCELLED)

    def _end_step(self) -> None:
        if self.steps and self.steps[-1]["seconds"] is None:
            self.steps[-1]["seconds"] = round(time.time() - self.steps[-1]["started"], 1)

    def _finish(self, state: JobState) -> None:
        self._end_step()
        self.state = state
        self.finished = time.time()
        self.save()

    # --- reporting --------------------------------------------------------------------

    def _read_tail(self) -> str:
        return tail_lines(self.log_path, TAIL_LINES) if self.log_path else ""

    def log_tail(self) -> str:
        return self._kept_tail if self._kept_tail is not None else self._read_tail()

    def to_json(self) -> dict[str, Any]:
        end = self.finished or time.time()
        steps = []
        for s in self.steps:
            open_ = s["seconds"] is None
            state = ("failed" if self.failed_step == s["name"] and not self.running else
                     "running" if open_ and self.running else "done")
            steps.append({"name": s["name"], "state": state,
                          "seconds": round(end - s["started"], 1) if open_
                          else s["seconds"]})
        return {**self.extra, "kind": self.kind, "name": self.name,
                "state": self.state.value, "step": self.step, "steps": steps,
                "all_steps": list(self.all_steps), "started": self.started,
                "finished": self.finished, "seconds": round(end - self.started, 1),
                "error": self.error, "failed_step": self.failed_step,
                "progress": self.progress,
                "log": str(self.log_path) if self.log_path else None,
                "log_tail": self.log_tail(), "result": self.result}

    # --- persistence ------------------------------------------------------------------

    def save(self) -> None:
        if self.directory is None:
            return
        doc = {"kind": self.kind, "name": self.name, "all_steps": self.all_steps,
               "log": str(self.log_path) if self.log_path else None, "extra": self.extra,
               "state": self.state.value, "step": self.step, "steps": self.steps,
               "started": self.started, "finished": self.finished, "error": self.error,
               "failed_step": self.failed_step, "result": self.result,
               "progress": self.progress}
        write_record(self.directory / STATUS_FILE, doc, FORMAT)

    @classmethod
    def load(cls, directory: Path, upgrades: dict[int, Any] | None = None) -> "Job":
        doc = read_record(directory / STATUS_FILE, FORMAT, upgrades)
        job = cls(doc["kind"], doc["name"], steps=doc.get("all_steps") or (),
                  directory=directory, log_path=Path(doc["log"]) if doc.get("log") else None,
                  extra=doc.get("extra"))
        job.state = JobState(doc["state"])
        job.step, job.steps = doc.get("step"), list(doc.get("steps") or [])
        job.started, job.finished = doc["started"], doc.get("finished")
        job.error, job.failed_step = doc.get("error"), doc.get("failed_step")
        job.result, job.progress = doc.get("result"), doc.get("progress")
        return job


JobBody = Callable[[Job], Awaitable[dict[str, Any] | None]]


class Jobs:
    """The agent's jobs by (kind, name): the latest job of each."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], Job] = {}

    def get(self, kind: str, name: str) -> Job | None:
        job = self._jobs.get((kind, name))
        if (job is not None and job.directory is None and job.finished is not None
                and time.time() - job.finished > KEEP_FINISHED):
            del self._jobs[(kind, name)]
            return None
        return job

    def status(self, kind: str, name: str, missing: str) -> dict[str, Any]:
        """The latest job's status document; NotFound with ``missing`` if there is none."""
        job = self.get(kind, name)
        if job is None:
            raise NotFound(missing, name=name)
        return job.to_json()

    def running(self, kind: str) -> list[Job]:
        return [j for (k, _), j in self._jobs.items() if k == kind and j.running]

    def all(self) -> list[Job]:
        return [j for key in list(self._jobs) if (j := self.get(*key)) is not None]

    def add(self, job: Job) -> Job:
        self._jobs[(job.kind, job.name)] = job
        job.save()
        return job

    def start(self, job: Job, body: JobBody) -> Job:
        """Run ``body(job)`` as a background task; its outcome ends the job."""
        self.add(job)
        job.task = asyncio.create_task(self._run(job, body, reraise=False))
        return job

    async def run(self, job: Job, body: JobBody) -> dict[str, Any] | None:
        """Run ``body(job)`` in the caller's task (a long request that is also a job);
        its error is recorded and raised."""
        self.add(job)
        return await self._run(job, body, reraise=True)

    async def _run(self, job: Job, body: JobBody, reraise: bool) -> dict[str, Any] | None:
        try:
            result = await body(job)
        except asyncio.CancelledError:
            job.cancel("the job was cancelled (agent stopping or client gone)")
            raise
        except VMAgentError as e:
            job.fail(e.message)
            if reraise:
                raise
            return None
        except Exception as e:  # noqa: BLE001 - a bug: the job says so, the log has it
            if is_no_space(e):
                job.fail(f"the file system is full: {e}")
            else:
                log.exception("%s %s failed", job.kind, job.name)
                job.fail(f"internal error: {type(e).__name__}: {e}")
            if reraise:
                raise
            return None
        if job.running:          # the body may have ended the job itself
            job.succeed(result)
        return result

    def recover(self, kind: str, root: Path,
                interrupted: Callable[[Job], None] | None = None,
                upgrades: dict[int, Any] | None = None) -> None:
        """Load the jobs kept under ``root/*/`` (``upgrades``: of older status files, see
        :func:`vmagent.fsutil.read_record`); one that was running when the agent stopped
        failed with it (``interrupted(job)`` cleans up after it first)."""
        if not root.is_dir():
            return
        for directory in sorted(root.iterdir()):
            if not (directory / STATUS_FILE).is_file():
                continue
            try:
                job = Job.load(directory, upgrades)
            except (OSError, ValueError, KeyError, TypeError, FormatError) as e:
                log.warning("ignoring unreadable job status in %s: %s", directory, e)
                continue
            if job.kind != kind:
                continue
            if job.running:
                if interrupted is not None:
                    interrupted(job)
                job.fail(f"the agent stopped during step {job.step}")
            self._jobs[(kind, job.name)] = job

    async def close(self) -> None:
        """Cancel the running jobs (agent shutdown) and let their cleanup finish."""
        tasks = [j.task for j in self._jobs.values() if j.running and j.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
