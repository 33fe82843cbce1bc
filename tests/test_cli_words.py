"""One vocabulary across commands (docs/cli.md, issue #18): every command's flags are the table's words, the old
words keep working for one release with one notice each, `train preview` is a subcommand, and presets have one
registry. Parsers only, except two tiny training runs."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from subjectdiff.catalogs.catalog import build, catalog_root
from subjectdiff.cli import build_parser, main
from subjectdiff.overrides import tomllib  # tomli on Python 3.10
from subjectdiff.presets import Presets, UnknownPreset
from tests.geometry import write_geometry_shards

ROOT = Path(__file__).resolve().parents[1]
DEPRECATED = {"--output", "--shards", "--metrics", "--n"}  # words no command may show any more


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its words: 'catalog select', 'train preview', ..."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if words and not subs:
            found[" ".join(words)] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, (*words, name))
        if getattr(parser, "preview", None) is not None:  # train's subcommand (train/cli.py TrainParser)
            walk(parser.preview, (*words, "preview"))

    walk(build_parser(), ())
    return found


def shown(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags --help shows."""
    return {o: a for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def hidden(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help == argparse.SUPPRESS for o in a.option_strings}


def notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if "is deprecated" in line]


def test_every_command_speaks_the_tables_words():
    """Each flag docs/cli.md's table gives a command is on its parser, shown in --help."""
    cmds = commands()
    section = (ROOT / "docs/cli.md").read_text().split("## Each command")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([a-z ]+)` \|(.*)\|$", section, flags=re.M)
    table = {cmd: re.findall(r"`(--[a-z-]+)", cells) for cmd, cells in rows if cmd in cmds}
    assert set(table) == set(cmds), "docs/cli.md's table lists every command"
    for cmd, flags in table.items():
        missing = set(flags) - set(shown(cmds[cmd]))
        assert not missing, f"{cmd}: {missing} in docs/cli.md but not on the command"


def test_no_command_shows_an_old_word_and_every_output_is_out():
    for cmd, parser in commands().items():
        flags = shown(parser)
        assert not DEPRECATED & set(flags), f"{cmd} shows {DEPRECATED & set(flags)}"
        outputs = {o for o, a in flags.items() if a.dest in {"out", "output", "out_dir", "output_dir"}}
        assert outputs <= {"--out"}, f"{cmd}: outputs {outputs} are not --out"
        if "--catalog" in flags:
            assert flags["--catalog"].metavar.startswith("FILE"), f"{cmd}: --catalog is the DuckDB file"
        if "--config" in flags:
            assert "--preset" in flags and flags["--config"].metavar == "FILE.toml", cmd


@pytest.mark.parametrize(
    "argv, old, attr, want",
    [
        (["datagen", "run", "--input", "src", "--output", "o"], "--output", "out", "o"),
        (["demo", "--output", "o"], "--output", "out", "o"),
        (
            ["eval", "dreambench", "--model", "m", "--data", "d", "--out", "o", "--metrics", "tiny"],
            "--metrics",
            "preset",
            "tiny",
        ),
        (["train", "--shards", "a", "--shards", "b"], "--shards", "records", ["a", "b"]),
        (["train", "--model", "tiny"], "--model", "arch", "tiny"),
        (["train", "preview", "--model", "tiny", "--out", "o"], "--model", "arch", "tiny"),
        (["train", "preview", "--shards", "a", "--out", "o"], "--shards", "records", ["a"]),
        (["train", "preview", "--n", "3", "--out", "o"], "--n", "sample", 3),
    ],
)
def test_an_old_flag_works_as_the_new_one_with_one_notice(argv, old, attr, want, capsys):
    args = build_parser(argv).parse_args(argv)
    assert getattr(args, attr) == want
    new = {"out": "--out", "preset": "--preset", "records": "--records", "sample": "--sample", "arch": "--arch"}[attr]
    assert notices(capsys.readouterr().err) == [
        f"subjectdiff: {old} is deprecated; use {new} (it will be removed in 0.3)"
    ]
    assert old in hidden(commands()[" ".join(w for w in argv[:2] if not w.startswith("-"))])


def test_datagen_run_output_reaches_the_command(tmp_path, capsys):
    """`datagen run --output DIR` still runs: a missing input is its one-line error, after one notice."""
    assert (
        main(["datagen", "run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--preset", "tiny"])
        == 2
    )
    err = capsys.readouterr().err
    assert len(notices(err)) == 1 and "not a folder" in err
    with pytest.raises(SystemExit):  # one of them, not both
        build_parser(["datagen"]).parse_args(["datagen", "run", "--input", "x", "--out", "a", "--output", "b"])


@pytest.mark.parametrize(
    "flags, notice",
    [
        (["--config", "tiny"], "--config tiny is deprecated; use --preset tiny"),
        (["--preset", "sd2_base"], "preset 'sd2_base' is deprecated; use 'sd2-base'"),
        (["--catalog", "out/"], "--catalog out/ (a shard folder) is deprecated; use --catalog DIR/catalog.duckdb"),
    ],
)
def test_old_config_words_resolve_with_one_notice(flags, notice, capsys):
    assert main(["train", *flags, "--print-config", "run.max_steps=7"]) == 0
    out, err = capsys.readouterr()
    cfg = tomllib.loads(out)
    assert cfg["run"]["max_steps"] == 7 and len(notices(err)) == 1 and notice in err
    if "tiny" in flags:
        assert cfg["model"]["arch"] == "tiny"
    if "--catalog" in flags:
        assert cfg["data"]["catalog"] == "out/"


@pytest.mark.parametrize("rank, printed", [("0", 1), ("1", 0), ("7", 0)])
def test_under_torchrun_rank_0_alone_prints_the_notice(rank, printed, monkeypatch, capsys):
    """torchrun runs the command once per rank: the old word works on every rank, its notice prints once."""
    monkeypatch.setenv("RANK", rank)
    assert main(["train", "--config", "tiny", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["model"]["arch"] == "tiny" and len(notices(err)) == printed


def test_config_file_and_preset_together(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text('preset = "paper"\n[optim]\nlr = 2\n')
    assert main(["train", "--config", str(f), "--print-config"]) == 0
    paper = tomllib.loads(capsys.readouterr().out)
    assert paper["optim"]["lr"] == 2.0 and paper["data"]["no_subject"] == "skip"  # the file's preset
    assert main(["train", "--preset", "tiny", "--config", str(f), "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["model"]["arch"] == "tiny" and not notices(err)  # --preset over the file's
    assert main(["train", "--preset", "no-such"]) == 2
    assert "unknown training preset 'no-such'; presets: tiny, sd2-base, paper" in capsys.readouterr().err


def test_train_preview_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "preview", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: subjectdiff train preview" in out and "--sample N" in out
    assert "--resume" not in out  # training's own flags are not preview's
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "preview" in out and "--resume" in out and "--sample" not in out
    assert main(["train", "--preset", "tiny", "preview", "--print-config"]) == 2  # not fished out of the overrides
    assert "put it first" in capsys.readouterr().err


def test_python_m_train_takes_preview_too(capsys):
    from subjectdiff.train.cli import main as train_main

    with pytest.raises(SystemExit):
        train_main(["preview", "--help"])
    assert "usage: python -m subjectdiff.train preview" in capsys.readouterr().out


def test_catalog_root_is_where_the_records_are(tmp_path):
    d = tmp_path / "d"
    write_geometry_shards(d)
    build(d)
    assert catalog_root(d / "catalog.duckdb") == str(d)
    elsewhere = tmp_path / "cats" / "mine.duckdb"
    elsewhere.parent.mkdir()
    build(d, catalog=elsewhere)
    assert Path(catalog_root(elsewhere)) == d  # the folder its build read
    shutil.copytree(d, tmp_path / "copy")
    assert catalog_root(tmp_path / "copy" / "catalog.duckdb") == str(tmp_path / "copy")  # a copied folder's own
    assert catalog_root(tmp_path / "new" / "catalog.duckdb") == str(tmp_path / "new")  # built there on first use


def traced(out: Path) -> set[str]:
    return {k for line in (out / "trace-rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]}


@pytest.mark.usefixtures("one_thread")
def test_a_catalog_file_elsewhere_and_the_old_folder_form_train_on_all_records(tmp_path, capsys):
    """`--catalog FILE.duckdb` alone: every record of the folder the catalog belongs to; `--catalog DIR` (old)
    the same, after one notice."""
    d = tmp_path / "d"
    keys = set(write_geometry_shards(d))
    cat = tmp_path / "mine.duckdb"
    build(d, catalog=cat)
    run = ["train", "--preset", "tiny", "run.max_steps=5", "data.batch_size=2", "run.trace=true", "run.progress='off'"]
    assert main([*run, "--catalog", str(cat), "--out", str(tmp_path / "a")]) == 0
    assert traced(tmp_path / "a") == keys and not notices(capsys.readouterr().err)
    assert main([*run, "--catalog", str(d), "--out", str(tmp_path / "b")]) == 0
    assert traced(tmp_path / "b") == keys and len(notices(capsys.readouterr().err)) == 1


def test_presets_have_one_registry():
    from subjectdiff.datagen import config as datagen_config
    from subjectdiff.datagen.job import preset
    from subjectdiff.infer import metrics
    from subjectdiff.model import config as model_config
    from subjectdiff.train import config as train_config

    registries = [datagen_config.PRESETS, train_config.PRESETS, metrics.PRESETS, model_config.PRESETS]
    assert all(isinstance(r, Presets) for r in registries)
    assert list(datagen_config.PRESETS) == ["default", "paper", "tiny", "full-random"]
    assert list(train_config.PRESETS) == ["tiny", "sd2-base", "paper"]  # the alias is not offered
    with pytest.raises(ValueError, match=r"unknown datagen preset 'x'; presets: default, paper, tiny, full-random"):
        preset("x")
    with pytest.raises(UnknownPreset):
        metrics.PRESETS["x"]
    assert train_config.PRESETS["sd2-base"] is train_config.sd2_base and "sd2_base" in train_config.PRESETS


@pytest.mark.parametrize(
    "command, settings",
    [
        (["train"], ["--preset", "tiny", "run.max_steps=7"]),
        (["datagen", "weights"], ["--preset", "paper", "ground.box_threshold=0.3"]),
        (["datagen", "run", "--input", "in/", "--out", "out/"], ["--batch-size", "3", "curate.pretrained=none"]),
    ],
)
def test_print_config_is_the_toml_config_reads_back(command, settings, tmp_path, capsys):
    """One behaviour across commands: --print-config prints the resolved config as TOML, and --config of that
    file resolves to the same config (printed the same), unset options included."""
    from subjectdiff.datagen.job import load_config as datagen_config

    assert main([*command, *settings, "--print-config"]) == 0
    text = capsys.readouterr().out
    values = tomllib.loads(text)
    assert "none" in text  # an unset option (TOML has no null)
    f = tmp_path / "printed.toml"
    f.write_text(text)
    assert main([*command, "--config", str(f), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    if command[0] == "datagen":
        cfg = datagen_config("default", str(f))  # laid over another preset: still the printed settings
        assert cfg.to_toml() == text and (cfg.stages.curate.pretrained is None) == ("run" in command)
        assert values["ground"]["box_threshold"] == (0.3 if "weights" in command else 0.25)
        assert values["pipeline"]["batch_size"] == (3 if "run" in command else cfg.pipeline.batch_size)
