"""The one place that knows every service: it builds them with their collaborators,
binds a handler to every row of the operation table, and starts and stops the agent's
background work. Everything else receives what it needs.

Dependencies point downward (docs/architecture.md): ``api`` -> ``templates`` ->
``vms`` / ``images`` -> ``identity`` / ``qemu`` -> the contract (``ops``, ``spec``,
``errors``, ``context``) and the helpers (``fsutil``, ``poll``, ``rundir``, ``jobs``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vmagent.alloc.config import AgentConfig, CgroupConfig
from vmagent.alloc.service import Allocator
from vmagent.api.access import access_guard
from vmagent.api.activity import Activity
from vmagent.api.audit import AuditLog, AuditService, audit_guard
from vmagent.api.dispatch import Dispatcher, Handler, disk_full_guard, lock_guard
from vmagent.api.links import LinkService, LinkTokens
from vmagent.api.opstats import OpStats
from vmagent.api.tokens import TokenStore
from vmagent.api.vmevents import operation_events_guard
from vmagent.identity.keys import KeyRegistry, KeysDir, KeysURL
from vmagent.identity.keyservice import KeyService
from vmagent.images.build.jobs import Builds
from vmagent.images.catalog import Catalog
from vmagent.images.pulls import Pulls
from vmagent.images.service import ImageService
from vmagent.images.store import ImageStore
from vmagent.jobs import Jobs
from vmagent.monitor import metrics, unistat
from vmagent.monitor.service import MonitorService
from vmagent.context import RequestContext
from vmagent.ops import OPERATIONS
from vmagent.qemu.argv import QEMU_BINARY
from vmagent.qemu.host import QemuHost
from vmagent.spec import Defaults
from vmagent.pools.service import PoolService
from vmagent.pools.store import PoolStore
from vmagent.templates.service import TemplateService
from vmagent.templates.store import TemplateStore
from vmagent.templates.warm import WarmCreator
from vmagent.vms.create import Creator
from vmagent.vms.events import EventLog
from vmagent.vms.ephemeral import Ephemeral
from vmagent.vms.history import History
from vmagent.vms.host import HostService
from vmagent.vms.launcher import Launcher, PortAllocator
from vmagent.vms.lifecycle import Lifecycle, Timeouts
from vmagent.vms.provision import Provisioner
from vmagent.vms.registry import VMRegistry
from vmagent.vms.service import VMService
from vmagent.vms.store import Store
from vmagent.vms.streams import VMStreams

log = logging.getLogger(__name__)


@dataclass
class Settings:
    state_dir: Path
    catalog: Catalog
    defaults: Defaults = field(default_factory=Defaults)
    qemu_binary: str = QEMU_BINARY
    lock_wait: float = 600.0          # how long an operation waits for a busy VM
    timeouts: Timeouts = field(default_factory=Timeouts)
    sandbox: bool = True
    accel_override: str | None = None  # "kvm"/"tcg": skip the probe
    keys_url: str | None = None        # a URL template for people's keys ({user})
    keys_ttl: float = 300.0            # how long fetched keys are used before a refetch
    allow_local_urls: bool = False     # pulls may reach loopback and private addresses
    # the agent's config file (vmagent/alloc/config.py): name, segments, capacity,
    # cgroups, GPUs; its [defaults] are ``defaults``. `vmagent serve` reads the file
    # (cgroups: auto); an agent built in code without one leaves the host's cgroups
    # alone (the tests' stub agents), unless its config asks for them
    config: AgentConfig = field(default_factory=lambda: AgentConfig(
        cgroup=CgroupConfig(mode="none")))


class Agent:
    """The services of one agent, wired together."""

    def __init__(self, settings: Settings, host: QemuHost | None = None) -> None:
        self.settings = settings
        state_dir = settings.state_dir
        self.host = host or QemuHost(settings.qemu_binary, settings.sandbox,
                                     settings.accel_override)
        self.jobs = Jobs()
        self.tokens = TokenStore(state_dir)
        self.audit = AuditLog(state_dir)
        self.keys = KeyRegistry(KeysDir(state_dir), KeysURL(
            settings.keys_url, state_dir, ttl=settings.keys_ttl) if settings.keys_url
            else None)
        self.store = Store(state_dir)
        self.registry = VMRegistry(self.store, settings.lock_wait)
        self.images = ImageStore(state_dir / "images", settings.catalog,
                                 allow_local_urls=settings.allow_local_urls)
        self.pulls = Pulls(self.images, self.jobs)
        self.ports = PortAllocator(lambda: (vm.rec.rt.ssh_port for vm in self.registry))
        # guarantees reserved, limits enforced (cgroups), GPUs (docs/allocation.md)
        self.alloc = Allocator(settings.config, state_dir, settings.defaults,
                               lambda: iter(self.registry),
                               accel=lambda: self.host.accel_name)
        self.registry.hooks.append(self.alloc.on_state)
        self.launcher = Launcher(self.registry, self.images, self.host, self.ports,
                                 self.alloc)
        self.provisioner = Provisioner(self.store, self.ports)
        self.creator = Creator(self.registry, self.provisioner, self.launcher, self.images,
                               settings.defaults, self.keys, self.pulls, self.alloc)
        self.lifecycle = Lifecycle(self.registry, self.launcher, settings.timeouts)
        self.templates = TemplateService(TemplateStore(state_dir / "templates"),
                                         self.registry, self.creator, self.host,
                                         settings.defaults, self.jobs)
        self.warm = WarmCreator(self.creator, self.templates, self.host)
        self.vms = VMService(self.registry, self.creator, self.lifecycle, self.images,
                             settings.defaults, warm=self.warm)
        # warm pools: paused clones handed over by create with pool=P
        self.pools = PoolService(PoolStore(state_dir / "pools"), self.registry, self.warm,
                                 self.templates, self.vms.remove, self.alloc)
        self.vms.pools = self.pools
        # ephemeral VMs go when they power off, VMs with a TTL when it passes
        self.ephemeral = Ephemeral(self.registry, self.vms.remove)
        self.registry.hooks.append(self.ephemeral.on_state)
        self.builds = Builds(state_dir, self.images, settings.catalog, self.jobs)
        self.image_ops = ImageService(self.images, self.builds, self.pulls, self.host,
                                      state_dir, users=self.image_users)
        self.host_ops = HostService(self.registry, self.host, state_dir, self.alloc)
        self.streams = VMStreams(self.registry)
        # the 1 Hz signals, broken VMs found and healed, the metrics (docs/monitoring.md)
        self.monitor = MonitorService(self.registry, self.lifecycle,
                                      settings.config.monitor)
        self.opstats = OpStats()
        self.sampler = metrics.Sampler(
            lambda: iter(self.registry), host=self.host_report,
            usage=self.alloc.usage_of, ops=lambda: self.opstats.histograms,
            jobs=lambda: [(j.kind, j.state.value) for j in self.jobs.all()],
            monitor=lambda: {"watched": len(self.monitor.signals),
                             "tick_seconds": self.monitor.tick_seconds,
                             "pending_restarts": len(self.monitor.healer.pending())})
        self.metrics_registry = metrics.registry_of(self.sampler)
        # the browser: sign-in links (vmctl ui, vmctl vnc) and what each VM is doing
        self.links = LinkService(LinkTokens(), lambda n: self.registry.find(n) is not None)
        self.activity = Activity()
        # outermost first: every change is audited (refusals too), the permission is
        # checked before an operation waits for its VM's lock
        self.dispatcher = Dispatcher(self.handlers(), [
            self.opstats.guard(), audit_guard(self.audit), disk_full_guard(state_dir),
            access_guard(self.people), self.activity.guard(),
            operation_events_guard(self.event_log_of),
            lock_guard(self.registry.locked)])

    def people(self, name: str) -> tuple[str | None, list[str]] | None:
        """Who may operate the VM ``name`` besides the operators (None: no such VM)."""
        vm = self.registry.find(name)
        return vm.people() if vm is not None else None

    def event_log_of(self, name: str) -> EventLog | None:
        vm = self.registry.find(name)
        return vm.event_log if vm is not None else None

    def host_report(self) -> dict:
        """What the metrics say of the host (the host operation's figures)."""
        return self.host_ops.report()

    async def metrics(self, ctx: RequestContext) -> str:
        return metrics.exposition(self.metrics_registry)

    async def unistat(self, ctx: RequestContext) -> list:
        return unistat.signals(self.sampler.sample())

    def image_users(self, image: str) -> list[str]:
        """What keeps an image from being removed or replaced: its VMs and templates."""
        vms = [vm.name for vm in self.registry if vm.rec.spec.image == image]
        return vms + self.templates.of_image(image)

    def handlers(self) -> dict[str, Handler]:
        """The handler of every operation, by name."""
        vms, life, img, tpl = self.vms, self.lifecycle, self.image_ops, self.templates
        keys = KeyService(self.keys)
        handlers: dict[str, Handler] = {
            "host": self.host_ops.show,
            "list": vms.list, "create": vms.create, "status": vms.status,
            "delete": vms.delete, "push_config": vms.push_config,
            "console_log": vms.console_log,
            "start": life.start, "reboot": life.reboot, "shutdown": life.shutdown,
            "reset": life.reset, "poweroff": life.poweroff, "hard_reset": life.hard_reset,
            "snapshot": life.snapshot, "snapshots": life.snapshots,
            "image_list": img.list, "image_import": img.import_, "image_pull": img.pull,
            "image_pull_status": img.pull_status, "image_pull_cancel": img.pull_cancel,
            "image_remove": img.remove, "image_build": img.build,
            "image_build_status": img.build_status,
            "template_create": tpl.create, "template_list": tpl.list,
            "template_show": tpl.show, "template_remove": tpl.remove,
            "pool_create": self.pools.create, "pool_list": self.pools.list,
            "pool_show": self.pools.show, "pool_remove": self.pools.remove_pool,
            "key_list": keys.list, "key_add": keys.add, "key_remove": keys.remove,
            "host_log": AuditService(self.audit).read,
            "events": History(self.registry).events,
            "vnc_link": self.links.vnc_link, "ui_link": self.links.ui_link,
            "metrics": self.metrics, "unistat": self.unistat,
        }
        # every stream row opens what its row names (vmagent/vms/streams.py)
        for op in OPERATIONS:
            if op.stream is not None:
                handlers[op.name] = functools.partial(self.streams.open, op.stream)
        return handlers

    async def start(self, probe_kernels: list[Path] = ()) -> None:
        """Re-adopt the VMs, choose the accelerator, start watching."""
        await self.vms.adopt()
        await self.ephemeral.sweep()       # powered off (or expired) while we were down
        await self.pools.start()           # definitions read back, members re-found
        kernels = list(probe_kernels) + [i.kernel for i in self.images.list() if i.kernel]
        accel = await self.host.choose_accel(self.settings.state_dir, kernels)
        log.info("accel %s (%s); %d VM(s)", accel.name, accel.reason, len(self.registry))
        self.monitor.start()
        self.ephemeral.start()

    async def stop(self) -> None:
        """Stop the background work; the VMs keep running."""
        await self.monitor.stop()
        await self.ephemeral.stop()
        await self.pools.stop()
        await self.builds.close()          # a running image build stops and cleans up
        await self.jobs.close()
        for vm in self.registry:
            await vm.detach()
