"""The shipped pipeline presets (demo, demo-quick) load and validate; unknown names list the shipped ones."""

import pytest

from trace_transfer.errors import ArtifactNotFoundError
from trace_transfer.pipeline.demo import load_preset, preset_path, presets


def test_shipped_presets_load_and_take_seeds():
    assert {"demo", "demo-quick"} <= set(presets())
    for name in presets():
        assert preset_path(name).is_file()
        assert load_preset(name).name
    assert load_preset("demo-quick", seeds=[3, 4]).seeds == [3, 4]


def test_unknown_preset_names_the_shipped_ones():
    with pytest.raises(ArtifactNotFoundError, match="demo-quick"):
        preset_path("demo-fast")
