"""The documentation that is derived from the code stays in step with it."""

from __future__ import annotations

import re
from pathlib import Path

from vmagent import ops

ROOT = Path(__file__).resolve().parents[1]


def test_api_doc_has_the_table_of_operations():
    text = (ROOT / "docs" / "api.md").read_text()
    block = re.search(r"<!-- ops:begin -->\n(.*?)<!-- ops:end -->", text, re.S)
    assert block, "docs/api.md has no generated table"
    assert block.group(1) == ops.markdown_table(), \
        "docs/api.md is out of date: python3 -m vmagent.ops"


def test_every_operation_has_an_answer_documented():
    text = (ROOT / "docs" / "api.md").read_text().split("## Answers", 1)[1]
    for op in ops.OPERATIONS:
        assert f"`{op.name}`" in text, op.name
