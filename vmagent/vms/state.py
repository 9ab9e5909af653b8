"""A VM's state and the transitions between states, declared once.

Every change of state goes through :meth:`vmagent.vms.registry.VMRegistry.transition`,
which checks it against :data:`TRANSITIONS`, writes the state file and logs an event; a
transition not listed here is a bug and is refused.
"""

from __future__ import annotations

import enum

from vmagent.errors import InternalError


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BROKEN = "broken"
    DELETING = "deleting"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    # start, delete
    S.STOPPED: frozenset({S.STARTING, S.DELETING,
                          S.RUNNING}),          # re-adoption: its qemu was found running
    # started, or the start failed (stopped), or qemu died while starting (broken)
    S.STARTING: frozenset({S.RUNNING, S.STOPPED, S.BROKEN, S.DELETING}),
    # shutdown, poweroff or the guest powered off (stopped), qemu died (broken),
    # hard_reset (starting again), delete
    S.RUNNING: frozenset({S.STOPPING, S.STOPPED, S.BROKEN, S.STARTING, S.DELETING}),
    S.STOPPING: frozenset({S.STOPPED, S.BROKEN, S.DELETING,
                           S.RUNNING}),         # re-adoption after an agent restart
    # start again, poweroff, re-adoption (qemu runs after all), delete
    S.BROKEN: frozenset({S.STARTING, S.STOPPED, S.RUNNING, S.DELETING}),
    S.DELETING: frozenset(),                    # the end (finished after a restart)
}

# where qemu may be running (its pid is reported)
ACTIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})


def check_transition(name: str, old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise InternalError(f"VM {name}: {old.value} -> {new.value} is not an allowed "
                            "state transition")
