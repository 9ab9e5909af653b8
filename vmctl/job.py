"""One CI job in a throw-away VM (``vmctl run``): create, copy in, run, copy out, delete.

The VM is ephemeral with a TTL of the job's timeout plus a margin, so it goes even if
vmctl itself is killed: the agent deletes it when its TTL passes (or when it powers
off, or at the agent's next start if it powered off meanwhile). vmctl deletes it
itself at the end, whatever the end: success, failure (unless ``--keep-on-failure``),
timeout, Ctrl-C (SIGINT), SIGTERM or SIGHUP.

The job's directory (``~/job`` in the guest) gets ``--copy DIR`` as one tar stream on
the same SSH connection that runs the command: ``tar -x`` reads the archive from the
session's stdin, then the command runs there; its stdout and stderr are streamed as
they come (stdout to stderr under ``--json``, whose record is the only thing on
stdout), and its exit code is vmctl's.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from .app import App
from .errors import AgentError, CLIError

TTL_MARGIN = 600          # seconds the VM outlives the job's timeout (the agent's net)
KEEP_MARGIN = 3600        # and, with --keep-on-failure, the time to look at a failure
DEFAULT_TTL = 6 * 3600    # the VM's TTL when the job has no timeout
TIMED_OUT = 124           # the exit code of a job that ran out of time (as timeout(1))
SIGNALLED = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
WORKDIR = "job"
JOB_CONNECT_TIMEOUT = 60  # seconds for the job VM's SSH banner (at least)
POOL_WAIT = 900           # how long a job waits for an empty pool without a timeout           # in the guest, under the SSH user's home


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class JobSpec:
    command: list[str]
    template: str | None = None
    pool: str | None = None
    copy: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    artifacts: list[str] = field(default_factory=list)
    artifacts_dir: Path = Path(".")
    keep_on_failure: bool = False
    name: str | None = None

    def ttl(self) -> int:
        base = DEFAULT_TTL if self.timeout is None else int(self.timeout) + TTL_MARGIN
        return base + (KEEP_MARGIN if self.keep_on_failure else 0)

    def remote_command(self) -> str:
        """What the job's SSH session runs in the guest."""
        cmd = self.command[0] if len(self.command) == 1 else shlex.join(self.command)
        steps = [f"mkdir -p {WORKDIR}", f"cd {WORKDIR}"]
        if self.copy is not None:
            steps.append("tar -xf -")
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in self.env.items())
        steps.append(f"exec env {env} sh -c {shlex.quote(cmd)}" if env
                     else f"exec sh -c {shlex.quote(cmd)}")
        return " && ".join(steps)


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not (key[0].isalpha() or key[0] == "_") or not all(
                c.isalnum() or c == "_" for c in key):
            raise CLIError(f"--env {item!r}: give NAME=VALUE (NAME: letters, digits, _)",
                           "bad_request")
        out[key] = value
    return out


class Job:
    def __init__(self, app: App, spec: JobSpec) -> None:
        self.app = app
        self.spec = spec
        self.name = spec.name or f"job-{uuid.uuid4().hex[:8]}"
        self.t0 = time.monotonic()
        self.phases: dict[str, float] = {}
        self.record: dict[str, Any] = {"vm": self.name, "host": None,
                                       "template": spec.template, "pool": spec.pool,
                                       "exit_code": None, "kept": False,
                                       "timed_out": False, "interrupted": None}
        self.status: dict | None = None
        self.created = False
        self._procs: list[subprocess.Popen] = []
        self._first_output: float | None = None

    # --- the job ----------------------------------------------------------------------

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in SIGNALLED}
        code: int | None = None
        try:
            self._phase("create", self._create)
            code = self._phase("run", self._command)
            if self.spec.artifacts and code != TIMED_OUT:
                ok = self._phase("artifacts", self._artifacts)
                if not ok and code == 0:
                    code = 1
        except Interrupted as e:
            self.record["interrupted"] = signal.Signals(e.signum).name
            code = SIGNALLED[e.signum]
        except KeyboardInterrupt:
            self.record["interrupted"] = "SIGINT"
            code = SIGNALLED[signal.SIGINT]
        finally:
            for s in SIGNALLED:                  # the cleanup is not interrupted
                signal.signal(s, signal.SIG_IGN)
            self._stop_children()
            failed = code is None or code != 0
            keep = (self.spec.keep_on_failure and failed and self.created
                    and self.record["interrupted"] is None)
            if keep:
                self.record["kept"] = True
            elif self.created or code is None:
                self._phase("delete", self._delete)
            for s, handler in old.items():
                signal.signal(s, handler)
        self.record["exit_code"] = code
        self.record["phases"] = self.phases
        self.record["total_s"] = round(time.monotonic() - self.t0, 3)
        if self._first_output is not None:
            self.record["first_output_s"] = round(self._first_output - self.t0, 3)
        return code

    def _phase(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        try:
            return fn()
        finally:
            self.phases[f"{name}_s"] = round(time.monotonic() - t, 3)

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    def _create(self) -> None:
        from . import keys, placement
        params: dict[str, Any] = {"ephemeral": True, "ttl": self.spec.ttl()}
        if self.spec.pool:
            params["pool"] = self.spec.pool
        else:
            params["template"] = self.spec.template
        pair = keys.default_key(self.app.config)
        if pair is not None:
            params["ssh_keys"] = [pair.public_text()]
        decision = None if self.spec.pool else placement.plan(self.app, self.name, params)
        self.created = True        # from here on a VM may exist: it is deleted at the end
        status, placed = self._create_call(placement, params, decision)
        self.status = status
        self.record["host"] = (placed or {}).get("chosen") or self.app.target.label
        self.record["handover"] = status.get("handover") or status.get("warm")

    def _create_call(self, placement: Any, params: dict, decision: Any) -> tuple:
        """The create; a pool with no ready VM is waited for (it is being refilled),
        within the job's timeout (else POOL_WAIT)."""
        limit = self.spec.timeout if self.spec.timeout is not None else POOL_WAIT
        said = False
        while True:
            try:
                return placement.create(self.app, self.name, params, decision)
            except AgentError as e:
                empty = e.code == "conflict" and (e.details or {}).get("refused") == "empty"
                if not empty or time.monotonic() - self.t0 > limit:
                    raise
                if not said:
                    self.app.out.info(f"vmctl: pool {self.spec.pool} has no ready VM; "
                                      "waiting for its refill")
                    said = True
                time.sleep(0.5)

    def _ssh(self, command: str) -> list[str]:
        from . import vmssh
        assert self.status is not None
        vmssh.pin_host_keys(self.app.call, self.app.target, self.status)
        argv = vmssh.ssh_argv(self.app.target, self.status, self.app.config, [command],
                              tty=False)
        # no prompts; a fresh clone on a busy host may greet slowly (ssh takes the first
        # value given for an option)
        return [argv[0], "-o", "BatchMode=yes", "-o",
                f"ConnectTimeout={max(vmssh.connect_timeout(), JOB_CONNECT_TIMEOUT):g}",
                *argv[1:]]

    def _command(self) -> int:
        argv = self._ssh(self.spec.remote_command())
        tar = None
        if self.spec.copy is not None:
            tar = self._spawn(["tar", "-c", "-f", "-", "-C", str(self.spec.copy), "."],
                              stdout=subprocess.PIPE)
        out_fd = sys.stderr.fileno() if self.app.json else sys.stdout.fileno()
        ssh = self._spawn(argv, stdin=tar.stdout if tar else subprocess.DEVNULL,
                          stdout=subprocess.PIPE)
        if tar is not None and tar.stdout is not None:
            tar.stdout.close()                   # ssh holds it now
        pump = threading.Thread(target=self._pump, args=(ssh.stdout.fileno(), out_fd),
                                daemon=True)
        pump.start()
        remaining = None
        if self.spec.timeout is not None:
            remaining = max(0.0, self.spec.timeout - (time.monotonic() - self.t0))
        try:
            code = ssh.wait(remaining)
        except subprocess.TimeoutExpired:
            self.record["timed_out"] = True
            self.app.out.info(f"vmctl: the job ran out of time ({self.spec.timeout:g}s); "
                              f"deleting {self.name}")
            return TIMED_OUT
        pump.join(5)
        if code == 255:
            click.echo(f"vmctl: the job's SSH session to {self.name} failed, or COMMAND "
                       "exited 255", err=True)
        if tar is not None and tar.wait() != 0:
            raise CLIError(f"--copy {self.spec.copy}: tar failed (exit {tar.returncode})",
                           "bad_request")
        return code

    def _pump(self, src: int, dst: int) -> None:
        """The command's stdout, as it comes; when its first bytes arrived."""
        while True:
            try:
                chunk = os.read(src, 65536)
            except OSError:
                return
            if not chunk:
                return
            if self._first_output is None:
                self._first_output = time.monotonic()
            try:
                os.write(dst, chunk)
            except OSError:
                return

    def _artifacts(self) -> bool:
        dest = self.spec.artifacts_dir
        dest.mkdir(parents=True, exist_ok=True)
        paths = " ".join(shlex.quote(p) for p in self.spec.artifacts)
        argv = self._ssh(f"cd {WORKDIR} && tar -c -f - -- {paths}")
        ssh = self._spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        untar = self._spawn(["tar", "-x", "-f", "-", "-C", str(dest)], stdin=ssh.stdout)
        if ssh.stdout is not None:
            ssh.stdout.close()
        ok = ssh.wait() == 0 and untar.wait() == 0
        self.record["artifacts"] = {"paths": self.spec.artifacts, "dir": str(dest),
                                    "ok": ok}
        if not ok:
            self.app.out.info(f"vmctl: copying the artifacts {', '.join(self.spec.artifacts)}"
                              f" back failed (ssh exit {ssh.returncode}, tar exit "
                              f"{untar.returncode})")
        return ok

    def _delete(self) -> None:
        from . import vmssh
        try:
            self.app.call("delete", name=self.name)
        except AgentError as e:
            if e.code != "not_found":
                self.app.out.info(f"vmctl: deleting {self.name} failed: {e.message} (the "
                                  f"agent deletes it when its TTL passes)")
                return
        if self.status is not None:
            vmssh.forget(self.app.target, self.status)

    # --- child processes --------------------------------------------------------------

    def _spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        # own process group: a Ctrl-C at the terminal reaches vmctl, which ends them
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def _stop_children(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def kept_message(self) -> str:
        host = self.record.get("host")
        on = f" -H {host}" if host and self.app.host else ""
        return (f"the job failed (exit {self.record['exit_code']}); its VM {self.name} is "
                f"kept: 'vmctl{on} ssh {self.name}' (work dir ~/{WORKDIR}), then "
                f"'vmctl{on} delete {self.name}'; the agent deletes it "
                f"{self.spec.ttl()}s after its creation (its TTL) or when it powers off")
