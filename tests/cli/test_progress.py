"""Progress on stderr (issue 19, item 7): one bar implementation, drawn on a terminal only, after
the delay, never with --quiet; diagnostic lines go through it; embed, zeroshot and dedup show it."""

import io
import json
import sys

import pytest

from tests.cli.helpers import shape_images, tiny_clip
from vlmfast.cli import main
from vlmfast.eval import _progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_none_in_a_pipe_or_when_quiet():
    terminal, pipe, quiet = Terminal(), io.StringIO(), Terminal()
    for stream, enabled in ((terminal, True), (pipe, True), (quiet, False)):
        with _progress.Progress(4, "work", unit="images", stream=stream, enabled=enabled, delay=0) as bar:
            bar.update(2)
            bar.write("skipped x.png: no such file")
            bar.update(2, status="done")
    shown = terminal.getvalue()
    assert "\rwork [" in shown and "4/4 images" in shown and "done" in shown and shown.endswith("\n")
    for stream in (pipe, quiet):  # only the diagnostic line
        assert stream.getvalue() == "skipped x.png: no such file\n"
    lines = shown.split("\n")
    assert any(line.endswith("skipped x.png: no such file") for line in lines)  # the bar stepped aside


def test_no_bar_before_the_delay():
    terminal = Terminal()
    with _progress.Progress(3, "quick", stream=terminal, delay=60) as bar:
        bar.update(3)
    assert terminal.getvalue() == ""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    shape_images(root / "images", 3)
    return tiny_clip(root / "model"), root / "images"


@pytest.mark.parametrize("command", ["embed", "zeroshot", "dedup"])
def test_commands_draw_a_bar_on_a_terminal_unless_quiet(setup, command, tmp_path, monkeypatch, capsys):
    model, images = setup
    argv = {"embed": ["embed", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "o")],
            "zeroshot": ["zeroshot", "--model", str(model), "--images", str(images), "--labels", "a,b"],
            "dedup": ["dedup", str(images)]}[command]
    monkeypatch.setattr(_progress, "DELAY", 0.0)
    for quiet in (False, True):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(argv + (["--quiet"] if quiet else []) + (["--overwrite"] if command == "embed" else [])) == 0
        drawn = "/3 images" in terminal.getvalue()
        assert drawn != quiet, (command, quiet, terminal.getvalue())
    out = capsys.readouterr().out  # stdout: results only, parseable
    if command == "zeroshot":
        assert all(json.loads(line)["labels"] for line in out.splitlines())
    else:
        assert json.loads(out[:out.index("}\n{") + 1]) if "}\n{" in out else json.loads(out)


def run(device, dtype, quick):  # a bench suite with nothing to measure (test_bench_shows_its_suites)
    return []


def test_bench_shows_its_suites(monkeypatch, capsys):
    from vlmfast.bench import runner

    monkeypatch.setattr(_progress, "DELAY", 0.0)
    monkeypatch.setattr(runner, "SUITES", {"rotary": __name__})
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert runner.main(["rotary", "--quick", "--device", "cpu", "--no-peaks"]) == 0
    assert "bench [" in terminal.getvalue() and "1/1 suites" in terminal.getvalue()
    assert "bench [" not in capsys.readouterr().out
