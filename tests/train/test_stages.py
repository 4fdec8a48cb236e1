"""Stage specs (`TASK[:CORESET]`): colons in task names, CoreSet after the last colon, clear errors."""

import os

import pytest

from trace_transfer.errors import ArtifactNotFoundError, ConfigError
from trace_transfer.train.methods import Stage
from trace_transfer.train.stages import parse_stage


@pytest.fixture
def in_tmp(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def test_plain_task_refs_keep_their_colons(in_tmp):
    assert parse_stage("synthetic:math") == Stage("synthetic:math")
    assert parse_stage("tasks/math.yaml") == Stage("tasks/math.yaml")
    assert parse_stage("  synthetic:code  ") == Stage("synthetic:code")


def test_coreset_after_last_colon(in_tmp):
    (in_tmp / "cores").mkdir()
    (in_tmp / "cores" / "math.coreset.safetensors").write_bytes(b"x")
    (in_tmp / "plain.bin").write_bytes(b"x")
    assert parse_stage("synthetic:math:cores/math.coreset.safetensors") == Stage(
        "synthetic:math", "cores/math.coreset.safetensors"
    )
    # any existing file after the last colon is the CoreSet, whatever its name
    assert parse_stage("synthetic:math:plain.bin") == Stage("synthetic:math", "plain.bin")


def test_missing_coreset_file_is_a_clear_error(in_tmp):
    with pytest.raises(ArtifactNotFoundError, match="cores/nope.coreset.safetensors"):
        parse_stage("synthetic:math:cores/nope.coreset.safetensors")


def test_task_file_whose_name_has_a_colon(in_tmp):
    (in_tmp / "odd:name.yaml").write_text("x")
    assert parse_stage("odd:name.yaml") == Stage("odd:name.yaml")


@pytest.mark.parametrize("bad", ["", "   ", ":x.coreset.safetensors"])
def test_malformed_stage_specs(in_tmp, bad):
    (in_tmp / "x.coreset.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError):
        parse_stage(bad)
