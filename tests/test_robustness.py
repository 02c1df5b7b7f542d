"""Bad input, in the command line and the API: each gets a SinkInterpError (or the CLI's one-line
error and exit status 2) naming the value, before any work, and nothing half-written is left."""

import argparse
import errno
import json
import sys
import time

import pytest
import yaml

import sinkinterp.models
from sinkinterp import SinkInterpError
from sinkinterp._io import atomic_write_json, check_writable_file, read_record, write_record
from sinkinterp._yaml import load_yaml
from sinkinterp.cli import build_parser, main, write_json_or_rescue
from sinkinterp.experiments import ExperimentSpec, builtin_specs, load_spec
from sinkinterp.stats import bootstrap_mean


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command gets as far as loading a model: its checks came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    real = sinkinterp.models.load_model
    bound = [m for name, m in sorted(sys.modules.items())
             if name.startswith("sinkinterp") and getattr(m, "load_model", None) is real]
    assert sinkinterp.models in bound and sinkinterp.cli in bound  # every module that calls it by this name
    for module in bound:
        monkeypatch.setattr(module, "load_model", refuse)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sinkinterp: error: ") and "Traceback" not in err
    return err


# ------------------------------------------------------------------ outputs, checked before the work


@pytest.mark.parametrize("command", [
    ["scan", "--json", "{d}"],
    ["scan", "--json", "{f}/x.json"],
    ["scan", "--figures", "{f}"],
    ["scan", "--json", "/proc/sinkinterp-no/x.json"],
    ["info", "--json", "{d}/x.txt"],
    ["view", "--prompt", "hi", "--out", "{f}/v.html"],
    ["heads", "--json", "{f}/h.json"],
    ["heads", "--figure", "{d}/h.svg"],
    ["run", "no-op", "--out", "{f}"],
    ["run", "no-op", "--figures", "{f}/figs"],
    ["demo", "--out", "{f}/demo"],
])
def test_unwritable_outputs_are_refused_before_the_model_loads(tmp_path, capsys, no_model, command):
    folder, blocker = tmp_path / "d", tmp_path / "file"
    folder.mkdir()
    blocker.write_text("in the way")
    argv = [part.format(d=folder, f=blocker) for part in command]
    err = _error(capsys, argv)
    assert any(flag in err for flag in ("--json", "--figures", "--out", "--figure"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file"] and not list(folder.iterdir())


def test_a_full_disk_keeps_the_results(tmp_path, monkeypatch, capsys):
    real = atomic_write_json
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr("sinkinterp.cli.atomic_write_json", full)  # the writer the CLI calls
    with pytest.raises(SinkInterpError, match=r"cannot write .*scan.json' \(No space left on device\); the results "
                                              r"were saved to (.*\.json)") as error:
        write_json_or_rescue(tmp_path / "scan.json", {"sink_ratio": 0.7})
    rescue = str(error.value).rsplit(" ", 1)[-1]
    assert json.loads(open(rescue).read()) == {"sink_ratio": 0.7}
    assert not (tmp_path / "scan.json").exists()


# ------------------------------------------------------------------ text that is not UTF-8


def test_arguments_that_are_not_utf8_are_refused(tmp_path, capsys, no_model):
    err = _error(capsys, ["view", "--prompt", "hi", "--title", "caf\udce9", "--out", str(tmp_path / "v.html")])
    assert "--title: argument 'caf\\\\udce9' is not valid UTF-8 text" in err
    assert list(tmp_path.iterdir()) == []


def test_a_spec_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SinkInterpError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_spec(path)


# ------------------------------------------------------------------ YAML read strictly


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # 9**9 = 387 million strings once expanded
    start = time.perf_counter()
    with pytest.raises(SinkInterpError, match=r"YAML aliases are not allowed \(\*a at line 2\)"):
        load_spec(path)
    assert time.perf_counter() - start < 1.0


def test_repeated_keys_and_non_finite_numbers_are_refused(tmp_path):
    with pytest.raises(SinkInterpError, match=r"key 'seed' appears twice in one mapping \(line 3\)"):
        load_yaml("name: x\nseed: 1\nseed: 2\n", "spec.yaml")
    with pytest.raises(SinkInterpError, match=r"spec: eps is nan: only finite numbers"):
        ExperimentSpec.from_dict({**yaml.safe_load(open(builtin_specs()["no-op"])), "eps": float("nan")})
    with pytest.raises(SinkInterpError, match=r"--set eps: the value is inf: only finite numbers"):
        load_yaml(".inf", "--set eps")


def test_set_values_that_are_not_yaml_are_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "no-op", "--set", "data.n_seqs=[1,"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--set data.n_seqs is not valid YAML" in err and "Traceback" not in err


def test_unbounded_resamples_are_refused_before_any_forward_pass():
    with pytest.raises(SinkInterpError, match=r"spec.bootstrap.n_resamples: must be in 100..100000, got 1000000000"):
        load_spec("no-op", {"bootstrap.n_resamples": 10**9})
    with pytest.raises(SinkInterpError, match="n_resamples must be an integer in 100..100000"):
        bootstrap_mean([1.0, 2.0, 3.0], n_resamples=10**9)


# ------------------------------------------------------------------ records verify themselves


def test_strict_json_and_checksummed_records(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"ratio": float("nan"), "x": [1.0, float("inf")]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == {
        "ratio": None, "x": [1.0, None]}
    record = write_record(tmp_path / "c.json", {"loss": [2.5, 3.25], "fingerprint": "f"})
    assert record == {"loss": [2.5, 3.25], "fingerprint": "f"} and read_record(tmp_path / "c.json") == (record, "")
    (tmp_path / "c.json").write_text((tmp_path / "c.json").read_text().replace("2.5", "2.75"))
    assert read_record(tmp_path / "c.json")[1] == "does not match its checksum (edited or damaged since it was written)"


# ------------------------------------------------------------------ help and templates


def test_every_option_with_a_default_shows_it_in_the_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                if "default" not in command.formatter_class(prog="x")._get_help_string(action):
                    missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
    text = sub.choices["scan"].format_help()
    assert "(default: 0.3 0.8)" in " ".join(text.split()) and "(default: smollm2-135m)" in " ".join(text.split())


def test_run_show_prints_a_spec_template(capsys):
    assert main(["run", "--show", "no-op"]) == 0
    text = capsys.readouterr().out
    assert text == builtin_specs()["no-op"].read_text()
    assert main(["run", "--show", "no-op", "--set", "seed=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved == load_spec("no-op", {"seed": 3}).to_dict() and resolved["seed"] == 3
    assert "no built-in spec of that name" in _error(capsys, ["run", "--show", "nope"])


def test_check_writable_file_names_the_problem(tmp_path):
    with pytest.raises(SinkInterpError, match=r"--json .* is a folder: give a file name"):
        check_writable_file(tmp_path, "--json")
    assert check_writable_file(tmp_path / "new" / "deeper" / "x.json", "--json", (".json",)).name == "x.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ------------------------------------------------------------------ the API: bad values get SinkInterpError


@pytest.fixture(scope="module")
def api_outcomes():
    """Run tests/bad_api.py in a plain interpreter: the suite's runtime type checker (jaxtyping with
    beartype) would otherwise answer annotated arguments first, and users do not run it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "tests.bad_api"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bad_api_values_get_a_sinkinterp_error(api_outcomes):
    from tests.bad_api import CASES

    assert len(api_outcomes) == len(CASES)
    wrong = [(i, CASES[i][0], outcome) for i, outcome in enumerate(api_outcomes)
             if outcome["type"] != "SinkInterpError" or not outcome["matches"] or outcome["hooks_left"]]
    assert wrong == []


def test_spec_fit_options_and_seeds_are_checked_when_the_spec_is_read():
    import copy

    record = load_spec("implicit-bias").to_dict()
    index = next(i for i, c in enumerate(record["conditions"])
                 if c["interventions"] and (c["interventions"][0].get("fit") or {}).get("method"))
    with pytest.raises(SinkInterpError, match=r"spec.seed: 1180591620717411303424 is outside 0..2\*\*63-1"):
        ExperimentSpec.from_dict({**record, "seed": 2**70})
    for key, value, message in [("steps", 0, r"fit.steps: 0 is not int"), ("lr", -1, r"fit.lr: -1 is not float"),
                                ("with_value", "no", r"fit.with_value: 'no' is not bool"),
                                ("method", "adam", r"fit.method: 'adam' is not 'moments' or 'gradient'")]:
        bad = copy.deepcopy(record)
        bad["conditions"][index]["interventions"][0]["fit"][key] = value
        with pytest.raises(SinkInterpError, match=message):
            ExperimentSpec.from_dict(bad)


def test_identical_recall_and_induction_sets_are_not_a_dissociation():
    from sinkinterp.heads import HeadValidation

    heads = ((0, 1), (1, 2))
    values = {"needle_loss": [1.0, 2.0, 3.0], "needle_accuracy": [0.5, 0.5, 0.5], "induction_loss": [2.0, 2.0, 3.0]}
    result = HeadValidation(k=2, ablation="mean", sets="top", n_resamples=200, seed=0, data={},
                            conditions={"clean": (), "recall": heads, "induction": heads[::-1], "random-0": ((2, 0),)},
                            per_seq={name: values for name in ("clean", "recall", "induction", "random", "random-0")})
    record = result.dissociation()
    assert record["testable"] is False and record["holds"] is None and "are the same heads" in record["why"]
    assert "double dissociation: not testable" in str(result)
