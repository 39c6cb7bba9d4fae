"""`flaxlazy inspect`'s usage errors: one line on stderr naming the option or argument,
what it expected and got, exit status 2, no traceback; stdout only the report."""

import json
import pathlib
import sys

import pytest

from flaxlazy._src import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
FACTORIES = "examples/factories.py"
MLP = [f"{FACTORIES}:mlp", "--input", "f32[4,784]"]
USER_CODE = """
import os
import sys

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

BAD_AXIS = [("**/kernel", P(None, "modle")), ("**", P("modle"))]


def exits_7():
    sys.exit(7)


def exits_bye():
    raise SystemExit("bye")


class ExitsInInit(nnx.Module):
    def __init__(self, *, rngs):
        sys.exit(5)


def chatty():
    print("building the model")
    sys.stdout.flush()
    os.write(1, b"a raw write to fd 1\\n")
    return nn.Dense(3), (jnp.zeros((2, 4)),)
"""


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A file of targets whose code exits, prints or has a bad rule; run from the root."""
    path = tmp_path / "user_code.py"
    path.write_text(USER_CODE)
    monkeypatch.chdir(ROOT)
    return path


def usage_error(argv, capsys):
    """Runs the command, checks it is a one-line usage error; returns that line."""
    assert cli.main(["inspect", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err, err
    assert err.startswith("flaxlazy: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("mesh, message", [
    ("data=99999999999999999999", "axis 'data' has size 99999999999999999999; sizes are "
                                  "positive ints of at most 2,147,483,647 devices in all"),
    ("data=" + "9" * 5000, "axis 'data' has size 999999999999... (5000 digits)"),
    ("data=65536,model=65536", "4,294,967,296 devices in all; a mesh holds at most "
                               "2,147,483,647"),
])
def test_mesh_too_large_is_named_before_jax(mesh, message, capsys, user_code):
    err = usage_error([*MLP, "--mesh", mesh], capsys)
    assert f"--mesh {mesh!r}: " in err and message in err and "bad_cast" not in err


@pytest.mark.parametrize("argv", [["--device-memory", "-1GiB"], ["--device-memory=-1GiB"]])
def test_negative_device_memory_is_rejected_by_name(argv, capsys, user_code):
    err = usage_error([*MLP, *argv], capsys)
    assert "--device-memory '-1GiB': a negative size; expected one device's memory, a " \
           "positive size such as 80GiB" in err


def test_zero_device_memory_is_rejected(capsys, user_code):
    err = usage_error([*MLP, "--device-memory", "0GiB"], capsys)
    assert "--device-memory '0GiB': 0 bytes; expected one device's memory" in err


def test_a_value_may_start_with_a_minus(capsys, user_code):
    assert cli.main(["inspect", f"{FACTORIES}:GPT", "--arg", "-1.5e3", "--json"]) == 2
    err = capsys.readouterr().err  # GPT rejects it, but --arg took it as its value
    assert "expected one argument" not in err and "inspecting" in err


@pytest.mark.parametrize("flag, value", [("--arg", "f32[2,"), ("--kwarg", "x=f32[2")])
def test_malformed_spec_in_arg_names_the_option_and_the_syntax(flag, value, capsys, user_code):
    err = usage_error([f"{FACTORIES}:GPT", flag, value], capsys)
    spec = value.partition("=")[2] or value
    assert f"{flag} {spec!r}: Malformed spec {spec!r}: expected the form DTYPE[DIM,DIM,...]" in err
    assert "quote it as a Python string" in err


def test_target_with_two_colons_is_malformed_not_an_import_error(capsys, user_code):
    err = usage_error([f"{FACTORIES}:mlp:extra", "--input", "f32[4,784]"], capsys)
    assert (f"TARGET '{FACTORIES}:mlp:extra': expected MODULE:NAME or FILE.py:NAME, one ':' "
            f"after the file or module, got 2. Name one object, e.g. '{FACTORIES}:mlp'") in err


@pytest.mark.parametrize("name, exit_", [("exits_7", "SystemExit(7)"),
                                         ("exits_bye", "SystemExit('bye')")])
def test_factory_that_exits_is_an_error_in_the_users_code(name, exit_, capsys, user_code):
    err = usage_error([f"{user_code}:{name}"], capsys)
    assert f"TARGET '{user_code}:{name}': the factory exited ({exit_}) instead of " \
           "returning a model" in err


def test_constructor_and_module_that_exit_are_errors_in_the_users_code(capsys, user_code,
                                                                       tmp_path):
    err = usage_error([f"{user_code}:ExitsInInit"], capsys)
    assert f"inspecting {user_code}:ExitsInInit failed: the model's code exited " \
           "(SystemExit(5))" in err
    (tmp_path / "script.py").write_text("import sys\nsys.exit(3)\n")
    err = usage_error([f"{tmp_path / 'script.py'}:model"], capsys)
    assert f"TARGET: importing {tmp_path / 'script.py'} exited (SystemExit(3))" in err
    assert "`if __name__ == '__main__':`" in err


def test_json_stdout_is_only_json_when_the_target_prints(capfd, user_code):
    assert cli.main(["inspect", f"{user_code}:chatty", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["model"] == "Dense"
    assert "building the model\n" in err and "a raw write to fd 1\n" in err
    assert cli.main(["inspect", f"{user_code}:chatty"]) == 0  # without --json: stdout
    assert "building the model" in capfd.readouterr().out


def test_errors_point_to_the_help_that_lists_the_options(capsys, user_code):
    err = usage_error([*MLP, "--bogus"], capsys)
    assert "unrecognized arguments: --bogus (see flaxlazy inspect --help)" in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "flaxlazy inspect --help" in capsys.readouterr().out


def test_a_problem_on_many_leaves_is_one_line(capsys, user_code):
    argv = ["inspect", *MLP, "--mesh", "data=2,model=4", "--rules", f"{user_code}:BAD_AXIS"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    problems = [line for line in text.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 2 and "problems         4 (materialize would stop" in text
    assert problems[0].startswith("problem: `partition_rules`: pattern '**' gives "
                                  "'params/layers_0/bias' (float32[256]) the spec P('modle',)")
    assert problems[0].endswith("The same for 1 more leaf: 'params/layers_2/bias'.")
    assert problems[1].endswith("The same for 1 more leaf: 'params/layers_2/kernel'.")

    assert cli.main([*argv, "--strict", "--json"]) == 1
    out, err = capsys.readouterr()
    assert len(json.loads(out)["problems"]) == 4  # JSON has every one
    assert err.count("\n") == 2 and "Traceback" not in err
    assert err.startswith("flaxlazy inspect: --strict: `partition_rules`: pattern '**'")


def _targets_in_sys_modules():
    return {name for name in sys.modules if name.startswith("_flaxlazy_target_")}


def test_the_command_leaves_sys_path_and_sys_modules_as_it_found_them(capsys, user_code):
    path, targets = list(sys.path), _targets_in_sys_modules()
    assert cli.main(["inspect", f"{user_code}:chatty"]) == 0
    assert cli.main(["inspect", f"{user_code}:chatty"]) == 0  # loaded already: the same
    capsys.readouterr()
    assert usage_error([f"{user_code}:exits_7"], capsys)  # a failing target too
    assert sys.path == path and _targets_in_sys_modules() == targets
    module = cli.load_module(str(user_code), "TARGET")  # the loader alone, as Python calls it
    assert module.exits_7 and sys.path == path and _targets_in_sys_modules() == targets
    assert cli.main(["inspect", "examples.factories:mlp", "--input", "f32[4,784]"]) == 0
    assert sys.path == path  # a dotted module: found from the current directory


def test_a_target_imports_modules_beside_it_while_the_command_runs(capsys, tmp_path,
                                                                   monkeypatch):
    (tmp_path / "beside_the_target.py").write_text(
        "import flax.linen as nn\n\ndef head():\n    return nn.Dense(3)\n")
    (tmp_path / "target.py").write_text(
        "import jax.numpy as jnp\n\n\ndef make():  # imports a module beside it when called\n"
        "    import beside_the_target\n\n    return beside_the_target.head(), "
        "(jnp.zeros((2, 4)),)\n")
    monkeypatch.delitem(sys.modules, "beside_the_target", raising=False)  # put back after
    path = list(sys.path)
    assert cli.main(["inspect", f"{tmp_path / 'target.py'}:make"]) == 0
    assert "Dense" in capsys.readouterr().out and sys.path == path
