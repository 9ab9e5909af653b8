"""Session fixtures for the integration tests: one agent with the test image, one
template saved from a booted test guest, and warm clones of it.

A test that needs *some* running guest asks for ``warm_vm`` and gets a clone in
seconds instead of a cold boot of a minute and more (TCG). The agent and the template
are made the first time a test asks for them, so the fast suite makes neither.
"""

from __future__ import annotations

import itertools

import pytest

from agent_helpers import AgentProcess, keypair, require_test_image

SESSION_TEMPLATE = "session-tpl"
SESSION_TOKEN = "session-operator-token-0123456789"


@pytest.fixture(scope="session")
def session_agent(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("session")
    agent = AgentProcess(base / "state", token=SESSION_TOKEN).start()
    try:
        agent.import_test_image()
        key = keypair(base, "session_key")
        agent.ok("POST", "/keys", {"keys": key.with_suffix(".pub").read_text()})
        agent.key = key
        yield agent
    finally:
        agent.cleanup()


@pytest.fixture(scope="session")
def session_template(session_agent) -> str:
    """A template of the test image (built once per session: a few minutes)."""
    session_agent.ok("POST", "/templates", {"template": SESSION_TEMPLATE, "image": "test",
                                            "cpus": 2, "memory": "1G", "disk": "4G"},
                     timeout=1800)
    return SESSION_TEMPLATE


_names = itertools.count(1)


@pytest.fixture
def warm_vm(session_agent, session_template):
    """``warm_vm(**fields)`` -> the status of a new running clone (deleted after)."""
    made: list[str] = []

    def make(**fields) -> dict:
        name = fields.pop("name", f"w{next(_names)}")
        st = session_agent.ok("POST", "/vms", {"name": name, "template": session_template,
                                               **fields}, timeout=600)
        made.append(name)
        return st

    yield make
    for name in made:
        session_agent.call("DELETE", f"/vms/{name}")

