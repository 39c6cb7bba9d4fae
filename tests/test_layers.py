"""The import contract in pyproject.toml: public API -> entrances -> stages -> core ->
_compat, the Linen and NNX entrances independent, no cycles; checked as `lint-imports`
checks it, and shown to break on an upward import, a cycle or an unplaced module."""

import copy
import pathlib

import grimp
import pytest
from importlinter import api
from importlinter import cli
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = str(ROOT / "pyproject.toml")
SRC = "flaxlazy._src"
KINDS = {"layers": LayersContract, "acyclic_siblings": AcyclicSiblingsContract}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("flaxlazy", cache_dir=None)


def broken(graph, *imports, modules=()):
    """The names of the contracts broken once ``imports`` (importer, imported) are added."""
    config = api.read_configuration(PYPROJECT)
    graph = copy.deepcopy(graph)
    for module in modules:
        graph.add_module(module)
    for importer, imported in imports:
        graph.add_import(importer=importer, imported=imported)
    out = []
    for options in config["contracts_options"]:
        contract = KINDS[options["type"]](
            name=options["name"], session_options=config["session_options"],
            contract_options=options,
        )
        if not contract.check(copy.deepcopy(graph), verbose=False).kept:
            out.append(options["id"])
    return out


def test_the_contract_holds():
    assert cli.lint_imports(config_filename=PYPROJECT, no_cache=True) == 0  # its report: stdout


def test_the_contract_holds_on_the_graph_the_other_tests_change(graph):
    assert broken(graph) == []


def test_compat_stays_a_leaf(graph):
    compat = f"{SRC}._compat"
    flaxlazy_imports = {m for m in graph.find_modules_directly_imported_by(compat)
                        if m.split(".")[0] == "flaxlazy"}
    assert flaxlazy_imports == set()
    assert broken(graph, (compat, f"{SRC}.programs")) == ["layers"]  # upward, and a cycle


def test_an_upward_import_breaks_the_layers(graph):
    assert broken(graph, (f"{SRC}.sources", f"{SRC}.materialize")) == ["layers"]
    assert broken(graph, (f"{SRC}.plan", f"{SRC}.cli")) == ["layers"]


@pytest.mark.parametrize("entrance, other", [("linen", "nnx"), ("nnx", "linen")])
def test_the_entrances_stay_independent(graph, entrance, other):
    child = sorted(graph.find_children(f"{SRC}.{entrance}"))[0]
    assert broken(graph, (child, f"{SRC}.{other}")) == ["layers"]
    # and the sources below them import neither
    assert broken(graph, (f"{SRC}.sources", child)) == ["layers"]


def test_a_cycle_inside_a_package_breaks_the_contract(graph):
    for package in ("sources", "nnx", "linen"):
        children = graph.find_children(f"{SRC}.{package}")
        pairs = [(a, b) for a in sorted(children) for b in sorted(children)
                 if graph.direct_import_exists(importer=a, imported=b)]
        if pairs:
            importer, imported = pairs[0]
            assert broken(graph, (imported, importer)) == ["acyclic"], package
            return
    pytest.fail("no package with an import between two of its modules")


def test_a_new_module_must_take_its_place_in_the_layers(graph):
    assert broken(graph, modules=[f"{SRC}.not_placed_anywhere"]) == ["layers"]
