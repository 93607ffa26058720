import pytest

from pyro_ssvi import NonFiniteLossError
from pyro_ssvi.cli import ArgumentParser, run_main


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
