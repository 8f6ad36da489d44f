"""Fuzzing the two doors a user's input comes through: the table loader (random bytes, random
near-valid JSON) and every subcommand's arguments (values near every edge, bad files of every
kind). The only outcomes allowed: a table or a one-line UsageError from the loader; exit 0, 1
(refit --check found a difference) or 2 with one line on stderr from the CLI, within a time
limit. Outcome counts are printed (pytest -s) for the notes."""
import collections
import copy
import json
import traceback

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gqa_lut.errors import UsageError
from gqa_lut.table import Table, table_from_json
from tests.fuzz_inputs import GOOD_TABLE, Hang, argvs, make_files, run_main

GOOD = json.loads(GOOD_TABLE.read_text())
OUTCOMES: collections.Counter = collections.Counter()

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
                           | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=4), max_leaves=12)


def _paths(doc, prefix=()):
    """Every (container, key) of a document, for mutation."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


PATHS = _paths(GOOD)


@st.composite
def near_valid(draw):
    doc = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            action = draw(st.sampled_from(["replace", "delete", "int", "edge"]))
            if action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif action == "int":
                parent[path[-1]] = draw(st.integers(-2 ** 64, 2 ** 64))
            elif action == "edge":
                parent[path[-1]] = draw(st.sampled_from([0, -1, 1, 2 ** 31, -2 ** 31 - 1, 2 ** 63, 1e309, -0.0,
                                                         [], {}, "", "0", None, True, [0, 0], [1, 0]]))
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass
    return doc


def _loader_outcome(load) -> str:
    try:
        load()
        return "loaded"
    except UsageError as exc:
        assert "\n" not in str(exc)
        return "refused"


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(near_valid())
def test_loader_on_near_valid_json(doc):
    outcome = _loader_outcome(lambda: table_from_json(doc))
    OUTCOMES["loader near-valid JSON: " + outcome] += 1
    if outcome == "loaded":
        assert isinstance(table_from_json(doc), Table)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_loader_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "t.json"
    path.write_bytes(data)
    from gqa_lut.table import load_table
    OUTCOMES["loader random bytes: " + _loader_outcome(lambda: load_table(path))] += 1


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    files = make_files(root / "in")
    out = root / "out"
    out.mkdir()
    return files, str(out)


def _cli(argv: list[str]) -> None:
    try:
        code, _, err = run_main(argv, seconds=120)
    except Hang:
        OUTCOMES["cli: hang"] += 1
        raise AssertionError(f"no answer in 120 s: {argv}") from None
    except BaseException as exc:  # noqa: BLE001 - a traceback is the failure this test looks for
        OUTCOMES["cli: traceback"] += 1
        raise AssertionError(f"{argv} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None
    OUTCOMES[f"cli: exit {code}"] += 1
    assert code in (0, 1, 2), (argv, code)
    if code == 2:
        assert err.startswith("gqa-lut: error: ") and err.count("\n") == 1, (argv, err)


def _cli_fuzz(examples: int):
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(fuzz_files, monkeypatch, data):
        files, out = fuzz_files
        monkeypatch.chdir(out)  # defaults like runs/... land in the test's folder
        _cli(data.draw(argvs(files, out)))
    return run


test_every_subcommand_on_bad_arguments = _cli_fuzz(150)
test_every_subcommand_on_bad_arguments_long = pytest.mark.slow(_cli_fuzz(1500))


@pytest.mark.parametrize("argv", [
    ["fit", "--op", "gelu", "--range", "-1e308", "1e308"],
    ["fit", "--op", "gelu", "--seed", "-1", "--generations", "1"],
    ["fit", "--op", "gelu", "--workers", "0"],
    ["plot", "{table}", "--range", "-inf", "inf", "--out", "{out}/p.png"],
    ["refit", "{bad_config}"],
    ["refit", "{config_list}"],
    ["import-reference", "{nested}", "--op", "gelu", "--range", "-4", "4", "--out", "{out}/r.json"],
    ["eval", "{nested}"],
    ["eval", "{dup_keys}"],
    ["eval", "{dev_zero}"],
    ["eval", "{fifo}"],
    ["fit", "--op", "gelu", "--weights", "{fifo}"],
    ["fit", "--op", "gelu", "--weights", "{w_nan}"],
    ["fit", "--op", "gelu", "--weights", "{w_complex}"],
    ["fit", "--op", "gelu", "--weights", "{ckpt_zip}"],
    ["eval", "{table}", "--expr", "x"],
    ["retnet", "eval", "--checkpoint", "{ckpt_empty}", "--out", "{out}/e.json"],
    ["retnet", "eval", "--checkpoint", "{ckpt_json}", "--out", "{out}/e.json"],
    ["retnet", "eval", "--checkpoint", "{ckpt_zip}", "--out", "{out}/e.json"],
    ["retnet", "eval", "--checkpoint", "{fifo}", "--out", "{out}/e.json"],
    ["retnet", "report", "{random}", "--out", "{out}/r.json", "--markdown", "{out}/r.md"],
    ["retnet", "report", "{list}", "--out", "{out}/r.json", "--markdown", "{out}/r.md"],
    ["retnet", "study", "--out", "", "--checkpoint", "{ckpt_empty}"],
    ["retnet", "export-c", "--checkpoint", "{ckpt_empty}", "--out", "{out}/" + "y" * 300],
])
def test_the_reported_tracebacks_are_one_line_errors(argv, fuzz_files, monkeypatch):
    files, out = fuzz_files
    monkeypatch.chdir(out)
    code, _, err = run_main([a.format(out=out, **files) for a in argv], seconds=120)
    assert code == 2 and err.startswith("gqa-lut: error: ") and err.count("\n") == 1, err


def test_print_outcomes():
    """Last in the file: what the fuzz tests above tried (run with -s to see it)."""
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))
