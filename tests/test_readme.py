"""The README's quick start runs as written."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    params = scope["variables"]["params"]
    assert (params["layers_2"]["kernel"] == 0).all()
    assert float(jnp.abs(params["layers_0"]["kernel"]).max()) <= (6 / (784 + 256)) ** 0.5
    assert "params/layers_0/kernel" in capsys.readouterr().out
