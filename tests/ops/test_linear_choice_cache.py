"""ops.linear's GEMM choices persist per machine setting: a later process starts from them
instead of timing each class again; a bad or unwritable file only means timing again."""

import json

import pytest

from vlmfast.ops import _choice_cache, _linear_choice

KEY = ("torch.float32", "torch.float32", "torch.float32", 64, 32, 128, "cached")


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE_DIR", str(tmp_path))
    previous = _linear_choice.set_mode("measure")
    yield tmp_path
    _linear_choice.set_mode(previous)


def _fails():
    raise AssertionError("timed although the decision was on disk")


def test_a_decision_is_written_and_a_new_process_reuses_it(measuring):
    backend = _linear_choice.choose(KEY, lambda: (lambda: None), lambda: (lambda: sum(range(20000))))
    assert backend == "vlmfast"  # ours does nothing: always the faster
    files = list(measuring.glob("linear_choice-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())[0]["backend"] == "vlmfast"
    _linear_choice.set_mode("measure")  # what a new process holds: no decision in memory
    assert _linear_choice.choose(KEY, _fails, _fails) == "vlmfast"
    assert _linear_choice.decisions()[0]["n"] == 64 and _linear_choice.decisions()[0]["work"] == "cached"


def test_a_file_of_the_older_layout_is_timed_again(measuring):
    """Entries keyed by the older "cached" flag (forward + backward timed as one class) are not
    read as the new classes."""
    entry = dict(zip(_choice_cache.FIELDS[:-1], KEY[:-1]), cached=True, backend="torch")
    _choice_cache.path().write_text(json.dumps([entry]))
    assert _linear_choice.choose(KEY, lambda: (lambda: None), lambda: (lambda: sum(range(20000)))) == "vlmfast"


def test_a_corrupt_file_is_ignored_and_replaced(measuring):
    path = _choice_cache.path()
    path.write_text("{not json")
    assert _linear_choice.choose(KEY, lambda: (lambda: sum(range(20000))), lambda: (lambda: None)) == "torch"
    assert json.loads(path.read_text())[0]["backend"] == "torch"


def test_the_setting_names_the_file_and_off_disables_it(measuring, monkeypatch):
    import torch

    first = _choice_cache.path()
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        assert _choice_cache.path() != first  # another thread count: another file
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("VLMFAST_CACHE_DIR", "off")
    assert _choice_cache.path() is None
    _linear_choice.choose(KEY, lambda: (lambda: None), lambda: (lambda: None))
    assert not list(measuring.glob("linear_choice-*"))


def test_another_gemm_configuration_names_another_file(measuring, monkeypatch):
    """Decisions timed against other blocking (or another level) are not reused."""
    first = _choice_cache.path()
    assert "f32_kc=" in _choice_cache._gemm_identity()  # the extension's blocking is in the setting
    monkeypatch.setattr(_choice_cache, "_gemm_identity", lambda: "isa=avx512,f32_kc=128")
    assert _choice_cache.path() != first


def test_an_unwritable_place_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VLMFAST_CACHE_DIR", str(blocker / "sub"))  # below a file: mkdir fails
    previous = _linear_choice.set_mode("measure")
    try:
        assert _linear_choice.choose(KEY, lambda: (lambda: None), lambda: (lambda: None)) in ("vlmfast", "torch")
    finally:
        _linear_choice.set_mode(previous)
