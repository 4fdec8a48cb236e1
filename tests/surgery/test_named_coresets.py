"""named_coresets: task metadata first, then the caller's fallback (e.g. file names), unique names."""

from types import SimpleNamespace

from trace_transfer.surgery.clustering import named_coresets


def _cs(task=None):
    return SimpleNamespace(metadata={"task": task} if task else {})


def test_task_metadata_then_fallback_then_index_and_repeats_numbered():
    a, b, c, d = _cs("math"), _cs("math"), _cs(), _cs()
    assert list(named_coresets([a, b, c, d], fallback=["f1", "f2", "code", "code"])) == ["math", "math#2", "code", "code#2"]
    assert list(named_coresets([c, a])) == ["task1", "math"]
    named = {"x": a}
    assert named_coresets(named) == named
