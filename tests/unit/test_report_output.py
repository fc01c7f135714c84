"""What `spillway report` writes is safe to open: text a client or a node chose (a model
name, an error code) is neither run by a spreadsheet nor by the operator's terminal."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import pytest

from spillway.cli.report import printable
from spillway.ledger.report import records_csv, summarize, to_csv
from tests.unit.test_ledger_writer import make_record


@pytest.mark.parametrize(
    "model", ['=HYPERLINK("http://evil","x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
)
def test_a_cell_a_spreadsheet_would_run_is_written_as_text(model: str) -> None:
    record = replace(make_record(1), model=model, error_code="=cmd|' /C calc'!A0")
    rows = list(csv.reader(io.StringIO("".join(records_csv([record])))))
    cells = dict(zip(rows[0], rows[1], strict=True))
    assert cells["model"] == "'" + model
    assert cells["error_code"] == "'=cmd|' /C calc'!A0"
    assert cells["prompt_tokens"] == "10" and cells["cost"] == "0.000123"  # numbers as they are
    summary = to_csv(summarize([record], "model"))
    assert "'" + model.replace('"', '""') in summary


def test_control_characters_are_not_printed_to_the_terminal() -> None:
    assert printable("m\x1b]8;;http://evil\x1b\\\nrow") == "m?]8;;http://evil?\\?row"
    assert printable("glm-5 · 中文") == "glm-5 · 中文"
