"""The shared output mechanisms: folder locks, atomic writes, progress lines, the CLI's I/O error policy."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from eclipse_prior.cli import describe_os_error, main
from eclipse_prior.outputs import LOCK_NAME, OutputBusyError, claim_dir, progress, write_json_atomic


def test_claim_dir_refuses_a_second_holder_and_names_the_first(tmp_path):
    out = tmp_path / "run"
    with claim_dir(out, "train --out run"):
        assert (out / LOCK_NAME).is_file()
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()} .*train --out run"):
            with claim_dir(out, "another"):
                pass
    with claim_dir(out, "after release"):  # released on exit
        pass


def test_claim_dir_is_released_when_the_holder_is_killed(tmp_path):
    out = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys, time
        from eclipse_prior.outputs import claim_dir
        with claim_dir({str(out)!r}, "holder"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"pid {proc.pid}"):
            with claim_dir(out, "second"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with claim_dir(out, "after kill -9"):  # the stale lock file does not block
        pass


def test_claim_dir_remove_lock_leaves_no_file_and_the_next_claim_holds(tmp_path):
    out = tmp_path / "export"
    with claim_dir(out, "first", remove_lock=True):
        with pytest.raises(OutputBusyError):
            with claim_dir(out, "second"):
                pass
    assert not (out / LOCK_NAME).exists()
    with claim_dir(out, "third"):  # a fresh lock file, held as usual
        with pytest.raises(OutputBusyError, match="third"):
            with claim_dir(out, "fourth"):
                pass


def test_claim_dir_refuses_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(Exception, match="is not a folder"):
        with claim_dir(path, "x"):
            pass
    assert path.read_text() == "x"


def test_write_json_atomic_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_progress_writes_whole_lines_when_not_a_terminal():
    stream = io.StringIO()
    for _ in progress(range(5), stream=stream, desc="work", log_every_s=0.0):
        pass
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("work") for line in lines)
    assert "5/5" in lines[-1]


def test_progress_disabled_prints_nothing():
    stream = io.StringIO()
    for _ in progress(range(3), enabled=False, stream=stream):
        pass
    assert stream.getvalue() == ""


def test_expected_os_errors_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "store"))
    assert describe_os_error(err).startswith(str(tmp_path / "store"))
    assert "no space left" in describe_os_error(err)

    import eclipse_prior.cli.evaluate as evaluate_cli

    def fail(args):
        raise err

    def fake_register(subparsers):
        subparsers.add_parser("evaluate").set_defaults(func=fail)

    monkeypatch.setattr(evaluate_cli, "register", fake_register)
    assert main(["evaluate"]) == 2
    captured = capsys.readouterr().err.strip().splitlines()
    assert len(captured) == 1 and "no space left" in captured[0]


def test_unexpected_os_errors_keep_their_traceback(monkeypatch):
    import eclipse_prior.cli.evaluate as evaluate_cli

    def fail(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    def fake_register(subparsers):
        subparsers.add_parser("evaluate").set_defaults(func=fail)

    monkeypatch.setattr(evaluate_cli, "register", fake_register)
    with pytest.raises(OSError):
        main(["evaluate"])
