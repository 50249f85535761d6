"""Every command of the click tree, walked automatically, answers user mistakes with one
`Error:` line and exit code 2, never a traceback: no arguments, each required parameter
missing, a nonexistent input path, a non-number, an empty file, a folder where a file is
expected, and an output path under a file (missing parents of an output are created, but a file
cannot hold a folder). A command added later is covered without anyone remembering to add it here."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from cli import avprep, avtrain

GROUPS = {"avprep": avprep, "avtrain": avtrain}
# commands for which no arguments at all is a complete, valid call
NO_ARGUMENTS_OK = {("avprep", "doctor"), ("avtrain", "recipes"), ("avtrain", "methods")}
# path parameters a command writes (a nonexistent path is what they expect)
OUTPUTS = {"out", "output", "out_dir", "run_dir", "png", "missing_file",
           "cache_dir"}  # cache_dir: created when missing, like an output folder
INPUT_OUTS = {("avprep", "inspect", "out"), ("avprep", "verify", "out")}  # OUT read, not written
# outputs these calls do not write: only remote shards are cached; --png only with --show
NOT_WRITTEN_HERE = {"cache_dir", "png"}


def commands():
    for group_name, group in GROUPS.items():
        for name in sorted(group.commands):
            yield group_name, name, group.commands[name]


def is_output(group: str, command: str, param: click.Parameter) -> bool:
    return param.name in OUTPUTS and (group, command, param.name) not in INPUT_OUTS


def is_numeric(param: click.Parameter) -> bool:
    return isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))


def wants_file(param: click.Parameter) -> bool:
    return isinstance(param.type, click.Path) and not param.type.dir_okay


def flag_of(param: click.Parameter) -> str | None:
    if isinstance(param, click.Argument):
        return None
    return max(param.opts, key=len)


# what a valid value of a parameter is, by name (the parameter under test is the only wrong one)
def valid_values(tmp, synth_dir, train_shards, tiny_run) -> dict[str, str]:
    return {"dataset": "synth", "root": str(synth_dir), "source": str(synth_dir),
            "manifest": str(synth_dir / "manifest.jsonl"), "shards": str(train_shards),
            "ckpt": str(tiny_run / "best.pt"), "runs": str(tiny_run),
            "features": f"audio={synth_dir}"}


ALWAYS_FILLED = {"shards", "run_dir"}  # optional in click (--config can give them), needed


def valid_looking(group: str, command: str, param: click.Parameter, tmp, valid: dict) -> str:
    """A value for a parameter that is not the one under test."""
    if isinstance(param.type, click.Path):
        if is_output(group, command, param):
            return str(tmp / f"new-{param.name}")
        if (group, command, param.name) in INPUT_OUTS:
            return valid["shards"]
    if param.name in valid:
        return valid[param.name]
    if isinstance(param.type, click.Choice):
        return str(param.type.choices[0])
    if is_numeric(param):
        return "1"
    return "x"


def args_for(group, command, params, tmp, valid, only=None, skip=None) -> list[str]:
    """Required parameters filled in with valid values (except `skip`), `only` overriding."""
    only = only or {}
    args, positional = [], []
    for p in params:
        if p.name == skip:
            continue
        if p.name in only:
            value = only[p.name]
        elif p.required or p.name in ALWAYS_FILLED:
            value = valid_looking(group, command, p, tmp, valid)
        else:
            continue
        flag = flag_of(p)
        if flag is None:
            positional.append(value)
        else:
            args += [flag, value]
    return positional + args


@pytest.fixture(scope="module")
def tiny_run(train_shards, tmp_path_factory):
    from avtrain.loop import fit

    run = tmp_path_factory.mktemp("tree") / "run"
    fit({"shards": str(train_shards), "run_dir": str(run), "model": "tiny", "epochs": 1,
         "steps_per_epoch": 1, "batch_size": 4, "image_size": 32, "workers": 0,
         "progress": False, "tensorboard": False})
    return run


def cases():
    for group, name, cmd in commands():
        params = [p for p in cmd.params if not getattr(p, "is_flag", False)
                  and p.name not in ("help",)]
        if (group, name) not in NO_ARGUMENTS_OK:
            yield pytest.param(group, name, "no arguments", None, id=f"{group}-{name}-noargs")
        for p in params:
            if p.required:
                yield pytest.param(group, name, "missing", p.name, id=f"{group}-{name}-no-{p.name}")
            if isinstance(p.type, click.Path) and not is_output(group, name, p):
                yield pytest.param(group, name, "nonexistent", p.name,
                                   id=f"{group}-{name}-{p.name}-nonexistent")
                if wants_file(p):
                    yield pytest.param(group, name, "empty file", p.name,
                                       id=f"{group}-{name}-{p.name}-empty")
            if wants_file(p):
                yield pytest.param(group, name, "folder", p.name,
                                   id=f"{group}-{name}-{p.name}-folder")
            if is_output(group, name, p) and p.name not in NOT_WRITTEN_HERE:
                yield pytest.param(group, name, "under a file", p.name,
                                   id=f"{group}-{name}-{p.name}-under-a-file")
            if is_numeric(p):
                yield pytest.param(group, name, "non-number", p.name,
                                   id=f"{group}-{name}-{p.name}-nan")


@pytest.mark.parametrize("group, name, case, param_name", list(cases()))
def test_every_mistake_is_one_error_line(group, name, case, param_name, tmp_path, synth_dir,
                                        train_shards, tiny_run):
    cmd = GROUPS[group].commands[name]
    params = [p for p in cmd.params if p.name != "help"]
    valid = valid_values(tmp_path, synth_dir, train_shards, tiny_run)

    def args_with(value=None, skip=None):
        only = {param_name: value} if value is not None else None
        return args_for(group, name, params, tmp_path, valid, only=only, skip=skip)

    if case == "no arguments":
        args = []
    elif case == "missing":
        args = args_with(skip=param_name)
    elif case == "nonexistent":
        args = args_with(str(tmp_path / "does-not-exist"))
    elif case == "empty file":
        (tmp_path / "empty").write_bytes(b"")
        args = args_with(str(tmp_path / "empty"))
    elif case == "folder":
        (tmp_path / "a-folder").mkdir()
        args = args_with(str(tmp_path / "a-folder"))
    elif case == "under a file":
        (tmp_path / "a-file").write_text("x\n")
        args = args_with(str(tmp_path / "a-file" / "new" / "out"))
    else:
        assert case == "non-number"
        args = args_with("not-a-number")
    result = CliRunner().invoke(GROUPS[group], [name, *args])
    output = result.output
    assert "Traceback" not in output
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"{group} {name} {args}: uncaught {result.exception!r}")
    assert result.exit_code == 2, f"{group} {name} {args} -> exit {result.exit_code}\n{output}"
    last = output.strip().splitlines()[-1] if output.strip() else ""
    assert last.startswith("Error:"), f"{group} {name} {args}:\n{output}"


def test_the_tree_is_walked():
    """The walk sees the commands people use, so an empty parametrisation cannot pass."""
    names = {(g, n) for g, n, _ in commands()}
    assert {("avprep", "build-shards"), ("avprep", "extract-frames"), ("avtrain", "fit"),
            ("avtrain", "eval"), ("avtrain", "report")} <= names
    assert len(list(cases())) > 60
