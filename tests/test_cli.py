import pytest

from pyro_ssvi import NonFiniteLossError
from pyro_ssvi.scripts.cli import ArgumentParser, run_main


class Oops(Exception):
    pass


def test_parser_errors_are_one_line(capsys):
    p = ArgumentParser(prog="tool")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tool: error: argument --n")


@pytest.mark.parametrize("exc, code", [(Oops("bad data dir"), 2), (NonFiniteLossError("step 3: nan"), 1), (KeyboardInterrupt(), 130)])
def test_run_main_turns_known_failures_into_exit_codes(capsys, exc, code):
    def main(argv):
        raise exc

    with pytest.raises(SystemExit) as e:
        run_main(main, [], usage_errors=(Oops,))
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1


def test_run_main_lets_bugs_through():
    def main(argv):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_main(main, [])


def test_run_main_runtime_errors_exit_1(capsys):
    def main(argv):
        raise Oops("disk full")

    with pytest.raises(SystemExit) as e:
        run_main(main, [], runtime_errors=(Oops,))
    assert e.value.code == 1 and capsys.readouterr().err == "error: disk full\n"


def test_output_file_problems(tmp_path):
    from pyro_ssvi.scripts.cli import output_file_problem

    (tmp_path / "f").write_text("x")
    assert output_file_problem(str(tmp_path / "new" / "r.json")) is None and (tmp_path / "new").is_dir()
    assert "is a folder" in output_file_problem(str(tmp_path))
    assert "is a file" in output_file_problem(str(tmp_path / "f" / "r.json"))
    assert "is a file" in output_file_problem(str(tmp_path / "f" / "deeper" / "r.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "new"] and not list((tmp_path / "new").iterdir())


def test_parser_refuses_unwritable_or_clashing_files(tmp_path, capsys):
    p = ArgumentParser(prog="tool")
    for check in (lambda: p.check_output_file("--out", str(tmp_path)),
                  lambda: p.check_image_file("--plot", str(tmp_path / "x.xyz")),
                  lambda: p.check_distinct_files([("--a", str(tmp_path / "x")), ("--b", None), ("--c", str(tmp_path / "." / "x"))])):
        with pytest.raises(SystemExit) as e:
            check()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("tool: error: --")
    p.check_image_file("--plot", str(tmp_path / "x.PNG"))  # matplotlib's own file types, any case


def test_output_into_a_closed_pipe_ends_quietly():
    """``script | head``: the reader stops early; the script exits 141 without a traceback."""
    import subprocess
    import sys

    code = ("from pyro_ssvi.scripts.cli import run_main\n"
            "def main(argv):\n"
            "    for i in range(200000):\n"
            "        print('line', i)\n"
            "run_main(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader is gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and err == "", err
