"""The one registry mechanism (patchlab.registry) behind metrics, probes, unlearning methods and attribution scorers."""

from __future__ import annotations

import pytest

from patchlab.errors import PatchlabValueError
from patchlab.registry import Registry, import_plugins


def test_registry_refuses_duplicates_and_names_the_known_entries_on_unknown():
    reg: Registry[int] = Registry("widget", name_of=str)
    reg.register(1)
    reg.register(2, "two")
    assert list(reg) == ["1", "two"] and reg["two"] == 2 and len(reg) == 2 and "two" in reg
    with pytest.raises(PatchlabValueError, match=r"a widget named 'two' is already registered.*registered: 1, two"):
        reg.register(3, "two")
    assert reg.register(3, "two", replace=True) == 3 and reg.get("two") == 3
    with pytest.raises(PatchlabValueError, match=r"unknown widget 'nope'; choose from 1, two"):
        reg.get("nope")
    assert reg.get("nope", None) is None
    reg["x"] = 4  # item assignment replaces (monkeypatch.setitem relies on it)
    del reg["x"]
    assert "x" not in reg


def test_registry_check_refuses_bad_entries():
    def positive(name: str, entry: int) -> None:
        if entry <= 0:
            raise PatchlabValueError(f"{name}: must be > 0")

    reg: Registry[int] = Registry("count", name_of=str, check=positive)
    with pytest.raises(PatchlabValueError, match="must be > 0"):
        reg.register(-1)
    with pytest.raises(PatchlabValueError, match="non-empty string"):
        reg.register(1, "")


def test_discovery_imports_every_module_of_a_folder(tmp_path, monkeypatch):
    pkg = tmp_path / "my_widgets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "beta.py").write_text("class W:\n    name = 'beta'\nENTRY = W()\n")
    (pkg / "alpha.py").write_text("class W:\n    name = 'alpha'\nENTRY = W()\n")
    (pkg / "_helper.py").write_text("raise RuntimeError('helpers are not imported')\n")
    (pkg / "plain.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", package="my_widgets", attribute="ENTRY")
    assert list(reg) == ["alpha", "beta"]
    ordered = Registry("widget", package="my_widgets", attribute="ENTRY", order=lambda n: n != "beta")
    assert list(ordered) == ["beta", "alpha"]
    strict = Registry("widget", package="my_widgets", attribute="ENTRY", strict=True)
    for _ in range(2):  # a failed discovery is not taken for a finished one
        with pytest.raises(PatchlabValueError, match="my_widgets.plain defines no ENTRY"):
            list(strict)


def test_import_plugins_names_a_module_that_does_not_import():
    with pytest.raises(PatchlabValueError, match="--plugin no_such_plugin_module: cannot import it"):
        import_plugins(["no_such_plugin_module"])


def test_every_axis_is_a_registry():
    from patchlab.patching.metrics import RECOVERY_METRICS
    from patchlab.probes import PROBES
    from patchlab.unlearning.attribution import SCORERS
    from patchlab.unlearning.methods import UNLEARNING_METHODS

    for reg in (RECOVERY_METRICS, PROBES, SCORERS, UNLEARNING_METHODS):
        assert isinstance(reg, Registry) and len(reg) > 0
    assert list(PROBES)[:6] == ["krs", "logit_lens", "uds", "relearning", "quantization", "behavior"]
    assert list(SCORERS)[:4] == ["wagle", "magnitude", "wanda", "random"]  # one file each, named after it
    assert all(SCORERS[name].__module__ == f"patchlab.unlearning.scorers.{name}" for name in list(SCORERS)[:4])
    with pytest.raises(PatchlabValueError, match="unknown attribution method 'nope'; choose from wagle"):
        SCORERS.get("nope")
