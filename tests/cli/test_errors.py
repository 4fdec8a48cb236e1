"""The one group-level error handler: deliberate errors are one `Error: ...` line with exit code 1,
bugs keep their traceback, click's own usage errors stay click's."""

from __future__ import annotations

import logging

import click
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.cli._errors import Group
from trace_transfer.cli.rules import command as rules_cli
from trace_transfer.errors import ArtifactNotFoundError


def _group() -> click.Group:
    @click.group(cls=Group)
    def cli() -> None:
        pass

    @cli.command("deliberate")
    def deliberate() -> None:
        raise ArtifactNotFoundError("probe directory 'x' not found; run `trace-transfer probe` first")

    @cli.command("bug")
    def bug() -> None:
        raise KeyError("oops")

    return cli


def test_trace_transfer_error_is_one_line_and_exit_code_1():
    res = CliRunner().invoke(_group(), ["deliberate"])
    assert res.exit_code == 1
    assert res.output == "Error: probe directory 'x' not found; run `trace-transfer probe` first\n"


def test_other_exceptions_keep_their_traceback():
    res = CliRunner().invoke(_group(), ["bug"])
    assert isinstance(res.exception, KeyError)  # not turned into a message: a bug must stay visible
    assert "Error:" not in res.output


def test_real_command_nested_group_and_direct_invocation():
    for cli, args in ((main, ["rules", "show", "no-such-family"]), (rules_cli, ["show", "no-such-family"])):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1, res.output
        assert res.output.startswith("Error: no rule file named 'no-such-family'; known families:")
        assert "Traceback" not in res.output


def test_click_usage_errors_stay_clicks():
    res = CliRunner().invoke(main, ["rules", "show"])
    assert res.exit_code == 2 and "Missing argument" in res.output


def test_vv_logs_the_traceback_of_an_error(caplog):
    caplog.set_level(logging.DEBUG, logger="trace_transfer.cli")
    res = CliRunner().invoke(main, ["-vv", "rules", "show", "no-such-family"])
    assert res.exit_code == 1
    [record] = [r for r in caplog.records if r.name == "trace_transfer.cli"]
    assert record.exc_info and record.exc_info[0].__name__ == "RuleError"
