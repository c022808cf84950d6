"""Issue 23, config hardening: duplicated YAML keys, hostile YAML (alias bombs, deep nesting, huge values), integer
ranges (seeds and every int, also inside free-form option mappings), flags among the overrides, labels that
become paths, and a run's own config.yaml that was moved or copied.

Every refused input must end as exit 2 and one line, with no traceback and nothing written. No test here may
start Ray: `no_ray` makes a start a failure (exit 1), so an input the old code accepted fails fast instead of
running a pipeline."""
import os
import shutil
import time

import pytest
import yaml

from raysub.cli import QUICKSTART, main
from raysub.config import load_config
from raysub.errors import ConfigError
from helpers import tree as tree_hash


@pytest.fixture(autouse=True)
def no_ray(monkeypatch, tmp_path):
    """Ray must not start, and the tests run in an empty cwd (a default run_dir would land there)."""
    import raysub.engine.cluster

    def refuse(*args, **kwargs):
        raise RuntimeError("Ray started for an input that should have been refused")

    monkeypatch.setattr(raysub.engine.cluster, "ensure_ray", refuse)
    monkeypatch.chdir(tmp_path)


def refused(capsys, tmp_path, args, needle, max_len=400):
    """Run ``raysub ARGS`` in-process: exit 2, one line naming ``needle``, no traceback, no byte written under
    tmp_path (the cwd, the run directories and the config files). Returns the line."""
    before = tree_hash(tmp_path)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err[:2000]
    assert err.startswith("raysub: error: ") and err.count("\n") == 1, err[:2000]
    assert "Traceback" not in err and "continue with:" not in err and "error-" not in err
    assert needle in err, err[:2000]
    assert len(err) <= max_len, f"{len(err)} characters: {err[:300]}"
    assert tree_hash(tmp_path) == before
    return err


def quickstart_with(tmp_path, name, text):
    """The quickstart config file with ``text`` appended, run_dir in tmp_path."""
    with open(QUICKSTART) as f:
        base = f.read().replace("run_dir: runs/quickstart", f"run_dir: {tmp_path / 'run'}")
    path = tmp_path / name
    path.write_text(base + text)
    return str(path)


# --- duplicated keys -------------------------------------------------------------------------------------

def test_duplicated_section_is_refused_naming_both_lines(tmp_path, capsys):
    """A second `sgd:` section silently replaced the first (its lr lost) and the run started. Catches: PyYAML's
    last-wins mapping kept; a message without the key or the lines."""
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\nsgd:\n  lr: 0.5\ntrain:\n  lr: 0.3\nsgd:\n  epochs: 30\n")
    err = refused(capsys, tmp_path, ["run", str(path)], "key 'sgd' appears twice, lines 2 and 6")
    assert "c.yaml is not valid YAML" in err and err.rstrip().endswith("keep one")


def test_duplicated_key_inside_a_section_and_an_override(tmp_path, capsys):
    """Duplicates are refused at every depth, and in an override's YAML value. Catches: a check of the top level
    only; an override's value falling back to its text."""
    path = quickstart_with(tmp_path, "c.yaml", "  weight_decay: 0.0\n  weight_decay: 0.1\n")
    refused(capsys, tmp_path, ["run", path], "key 'weight_decay' appears twice")
    refused(capsys, tmp_path, ["run", "model.options={hidden: [8], hidden: [16]}", f"run_dir={tmp_path}/r"],
            "override 'model.options': the value is not valid YAML (key 'hidden' appears twice")


def test_repeated_values_are_not_duplicated_keys():
    """Not every repetition is a duplicate: list items may repeat, other mappings may reuse a key."""
    cfg = load_config(None, ["sgd.lr_milestones=[5, 5]", "model.options={hidden: [8, 8]}",
                             "train.projection_options={a: {x: 1}, b: {x: 1}}"])
    assert cfg.sgd.lr_milestones == [5, 5] and cfg.train.projection_options == {"a": {"x": 1}, "b": {"x": 1}}


# --- hostile YAML ----------------------------------------------------------------------------------------

def _alias_bomb(levels: int) -> str:
    lines = ["    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "train:\n  projection_options:\n" + "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """9 levels of aliases took 44 s and a MemoryError (about 6 GB uncapped); here 5 levels, which the old code
    expanded and echoed. Catches: aliases resolved (any expansion), or refused only after construction."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(5))
    t0 = time.perf_counter()
    refused(capsys, tmp_path, ["run", str(path)], "bomb.yaml is not valid YAML (alias *a0 at line 4")
    assert time.perf_counter() - t0 < 5


def test_alias_in_an_override_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, ["run", "model.options={hidden: &h [8], other: *h}", f"run_dir={tmp_path}/r"],
            "override 'model.options': the value is not valid YAML (alias *h")


@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_is_invalid_yaml_not_a_crash(tmp_path, capsys, where):
    """100,000 nested brackets: RecursionError, exit 1 and a --resume hint. Catches: no depth limit (the
    composer recursing), or the RecursionError escaping as a failure."""
    deep = "[" * 100_000 + "]" * 100_000
    if where == "file":
        path = quickstart_with(tmp_path, "deep.yaml", f"  optimizer_options: {{x: {deep}}}\n")
        refused(capsys, tmp_path, ["run", path], "deep.yaml is not valid YAML (nested deeper than 50 levels")
    else:
        deep = deep[90_000:-90_000]  # 10,000 levels: an override's value is at most 64 KiB
        refused(capsys, tmp_path, ["run", f"train.projection_options.x={deep}", f"run_dir={tmp_path}/r"],
                "override 'train.projection_options.x': the value is not valid YAML (nested deeper than 50 levels")


def test_a_config_nested_a_few_levels_still_reads():
    cfg = load_config(None, ["train.projection_options={a: {b: {c: [[[1]]]}}}"])
    assert cfg.train.projection_options == {"a": {"b": {"c": [[[1]]]}}}


@pytest.mark.parametrize("override, size, needle", [
    ("train.epochs=", 10_000_000, "override 'train.epochs': a value of 10,000,000 characters: at most 65,536"),
    ("train.epochs=", 60_000, "train.epochs: expected an integer, got 'xxxx"),
    ("sgd.optimizer=", 60_000, "sgd.optimizer: a name of 60,000 characters ('xxxx"),
    ("train.optimizer=", 101, "train.optimizer: a name of 101 characters ('xxxx"),
    ("sweep.families=", 200, "sweep.families: expected a list, got 'xxxx"),
    ("train.optimizer_options={c: [", 60_000, "optimizer 'pbfgs' option c=['xx', 'xx', "),
    ("train.label=", 60_000, "train.label: a string of 60,000 characters"),
    ("model.options.hidden=", 60_000, "model.options.hidden: a string of 60,000 characters"),
    ("model.options={", 60_000, "model.options: expected a mapping, got 'xxxx"),
])
def test_a_huge_value_is_not_echoed(tmp_path, capsys, override, size, needle):
    """A 10 MB wrong-typed value was echoed whole as the 'one line'. Catches: an untruncated repr in a message;
    a huge override parsed (seconds per 10 MB) instead of refused by its size."""
    value = "x" * size
    if override.endswith("{"):
        override = override[:-1]
    elif override.endswith("["):  # a long list inside an option mapping, echoed by the option's checker
        override, value = override.replace("optimizer_options", "optimizer=pbfgs train.optimizer_options"), \
            ", ".join(["xx"] * (size // 4)) + "]}"
    err = refused(capsys, tmp_path, ["run", *(override + value).split(" ", 1), f"run_dir={tmp_path}/r"], needle)
    assert "…" in err or "at most" in err


def test_a_huge_value_in_a_file_is_not_echoed(tmp_path, capsys):
    path = quickstart_with(tmp_path, "big.yaml", f"  dim: [{', '.join(['1'] * 20_000)}]\n")
    refused(capsys, tmp_path, ["run", path], "train.dim: expected an integer, got [1, 1, 1")
    path = quickstart_with(tmp_path, "huge.yaml", "  label: " + "x" * 10_000_000 + "\n")
    refused(capsys, tmp_path, ["run", path], "huge.yaml is larger than 1 MiB")


# --- integer ranges --------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("seed=99999999999999999999999", "seed=99999999999999999999999: a seed must be an integer in [0, 2**32)"),
    ("seed=4294967296", "seed=4294967296: a seed must be an integer in [0, 2**32)"),
    ("seed=-1", "seed=-1: a seed must be an integer in [0, 2**32)"),
    ("train.data_seed=4294967296", "train.data_seed=4294967296: a seed"),
    ("data.val_seed=-5", "data.val_seed=-5: a seed"),
    ("data.label_noise_seed=99999999999999999999", "data.label_noise_seed=99999999999999999999: a seed"),
    ("l2o.seed=100000000", "l2o.seed=100000000: a seed must be an integer in [0, 10**8)"),
    ("seed=" + "9" * 5000, "override 'seed': the value is not valid YAML (a number of 5,000 characters"),
    ("sgd.epochs=99999999999999999999999", "sgd.epochs=99999999999999999999999: out of range"),
    ("sgd.lr_milestones=[3, 99999999999999999999999]", "sgd.lr_milestones[1]=99999999999999999999999: out of range"),
    ("sgd.lr_milestones=[-3]", "sgd.lr_milestones=[-3]: epochs are ≥ 0"),
    ("cluster.num_cpus=0", "cluster.num_cpus=0: must be > 0"),
    ("model.options={hidden: [99999999999999999999999]}",
     "model.options.hidden[0]=99999999999999999999999: out of range: an integer here must fit 64 bits"),
    ("train.projection_options={seed_offset: -99999999999999999999999}",
     "train.projection_options.seed_offset=-99999999999999999999999: out of range"),
], ids=lambda v: v if len(v) < 60 else v[:40] + "…")
def test_integers_out_of_range_are_refused(tmp_path, capsys, override, needle):
    """`seed=99999999999999999999999` ended in 'Overflow when unpacking long long', exit 1 and a --resume hint;
    other ints overflowed later, in torch. Catches: a seed (or an int in a free-form option mapping) reaching
    torch unchecked; a bound that lets a derived seed overflow (see the next test)."""
    refused(capsys, tmp_path, ["run", override, f"run_dir={tmp_path}/r"], needle)


def test_every_seed_in_range_gives_seeds_torch_accepts():
    """The largest accepted seeds, through every derivation raysub makes, are still seeds torch and numpy take.
    Catches: a seed bound too loose for seed·100,003 + epoch or l2o.seed·1,000,003·100,003."""
    import numpy as np
    import torch

    from raysub.engine.loop import mix_seed
    from raysub.l2o.metatest import METATEST_SERIAL
    from raysub.l2o.seeds import optimizee_seed
    from raysub.projections._common import generator

    cfg = load_config(None, [f"seed={2 ** 32 - 1}", f"l2o.seed={10 ** 8 - 1}", f"train.data_seed={2 ** 32 - 1}",
                             f"sweep.seeds=[0, {2 ** 32 - 1}]", f"l2o_tune.seed={2 ** 32 - 1}"])
    epoch = 10 ** 6
    for seed in (cfg.seed, cfg.train_data_seed, mix_seed(cfg.seed, epoch),
                 optimizee_seed(cfg, METATEST_SERIAL + 10 ** 5),
                 mix_seed(optimizee_seed(cfg, METATEST_SERIAL + 10 ** 5), epoch)):
        torch.Generator().manual_seed(seed)
    torch.manual_seed(cfg.seed)
    np.random.RandomState(cfg.seed)
    generator(cfg.seed, 3)


# --- flags anywhere --------------------------------------------------------------------------------------

def test_a_flag_among_the_overrides(tmp_path, capsys):
    """`raysub run run_dir=x --overwrite sgd.epochs=2` printed argparse's usage. basis.dim=0 after the flag must
    be read (it stops the run before Ray) and win over the earlier basis.dim=3. Catches: the overrides after a
    flag dropped, refused, or put before the earlier ones."""
    refused(capsys, tmp_path, ["run", f"run_dir={tmp_path}/r", "basis.dim=3", "--overwrite", "basis.dim=0",
                               "train.lr=-1"], "basis.dim=0: must be > 0; train.lr=-1.0: must be > 0")
    rc = main(["run", "basis.dim=3", "--resume", "basis.dim=0", f"run_dir={tmp_path}/r"])
    assert rc == 2 and "basis.dim=0: must be > 0" in capsys.readouterr().err


def test_a_flag_among_the_overrides_of_every_command(tmp_path, capsys):
    cfg = quickstart_with(tmp_path, "c.yaml", "")
    refused(capsys, tmp_path, ["sample", cfg, "--resume", "sgd.lr=-1"], "sgd.lr=-1.0: must be > 0")
    refused(capsys, tmp_path, ["sweep", cfg, "--overwrite", "sweep.threshold=2"], "sweep.threshold=2.0")
    refused(capsys, tmp_path, ["l2o", "meta-train", cfg, "--resume", "l2o.unroll=0"], "l2o.unroll=0: must be > 0")
    refused(capsys, tmp_path, ["l2o", "tune", cfg, "--resume", "l2o_tune.samples=0"],
            "l2o_tune.samples=0: must be ≥ 1")
    refused(capsys, tmp_path, ["train", cfg, "--overwrite", "train.lr=-1"], "train.lr=-1.0: must be > 0")


def test_a_flag_among_the_overrides_of_a_stage(tmp_path, capsys, fake_run):
    refused(capsys, tmp_path, ["train", str(fake_run), "--resume", "train.epochs=0"], "train.epochs=0: must be > 0")
    refused(capsys, tmp_path, ["basis", str(fake_run), "--overwrite", "basis.dim=0"], "basis.dim=0")


def test_an_unknown_flag_anywhere_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "basis.dim=3", "--overwrit", "basis.dim=0"])
    assert exc.value.code == 2 and "unrecognized arguments: --overwrit" in capsys.readouterr().err


# --- names that become paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["../../x", "../../other_run/manifest", "a/b", "/abs", ".hidden", "..", "x" * 101,
                                   "sp ace", "new\nline", "semi;colon"])
def test_an_unsafe_label_is_refused(tmp_path, capsys, label):
    """`train.label=../../x` wrote x.pt/x.json outside the run; `../../other_run/manifest` destroyed another run.
    Catches: a label used in a path unchecked, or a check that misses '..', '/', a leading '.' or the length."""
    refused(capsys, tmp_path, ["run", f"train.label={label}", f"run_dir={tmp_path}/r"],
            "a label names files of the run (train/LABEL.pt, curves/LABEL.json)")


def test_an_unsafe_label_on_an_existing_run(tmp_path, capsys, fake_run):
    victim = tmp_path / "other_run"
    shutil.copytree(fake_run, victim)
    refused(capsys, tmp_path, ["train", str(fake_run), "train.label=../other_run/manifest"], "train.label=")


@pytest.mark.parametrize("label", ["psgd-2", "run_1.v2", "A", "x" * 100, "0"])
def test_a_safe_label_passes(label):
    from raysub.config import schema_problems

    assert not [p for p in schema_problems(load_config(None, [f"train.label={label}"])) if "label" in p]


# --- a run's own config.yaml -----------------------------------------------------------------------------

@pytest.fixture
def fake_run(tmp_path):
    """A run directory as `raysub sample` starts it (θ0, manifest, config.yaml), made without Ray."""
    from raysub.pipeline.plan import plan
    from raysub.runs.records import init_run
    from raysub.storage import RunDir

    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path / 'orig'}"])
    info = plan(cfg)
    cfg.run_dir = RunDir(cfg.run_dir).uri
    init_run(cfg, info, False, False)
    return tmp_path / "orig"


def test_a_moved_runs_config_runs_where_it_was_read(tmp_path, fake_run):
    """A moved run's config.yaml still names the old run_dir: `--resume` started a new run there. Catches: the
    stored run_dir used; the directory taken for a file that is not a run's own config."""
    moved = tmp_path / "moved"
    os.rename(fake_run, moved)
    assert load_config(str(moved / "config.yaml")).run_dir == str(moved)
    os.chdir(moved)
    assert load_config("config.yaml").run_dir == str(moved)
    assert load_config(f"file://{moved}/config.yaml").run_dir == f"file://{moved}"
    # a config.yaml that is no run's (no manifest.json beside it) keeps its run_dir
    (tmp_path / "plain").mkdir()
    shutil.copy(moved / "config.yaml", tmp_path / "plain" / "config.yaml")
    assert load_config(str(tmp_path / "plain" / "config.yaml")).run_dir == str(fake_run)
    # an l2o tuning has no manifest, but its Ray Tune experiment folder
    (tmp_path / "plain" / "tune").mkdir()
    assert load_config(str(tmp_path / "plain" / "config.yaml")).run_dir == str(tmp_path / "plain")


def test_a_copied_runs_config_names_the_copy(tmp_path, capsys, fake_run):
    """On a copy, `raysub run COPY/config.yaml --overwrite` destroyed the original: the command acted on the
    original's directory. Without a flag both are refused as existing; the line must name the copy."""
    copy = tmp_path / "copy"
    shutil.copytree(fake_run, copy)
    err = refused(capsys, tmp_path, ["run", str(copy / "config.yaml")], f"run directory {copy} already exists")
    assert str(fake_run) not in err


def test_a_runs_config_with_another_run_dir_is_refused(tmp_path, capsys, fake_run):
    """`run_dir=` naming another directory than the run the config.yaml belongs to: refused in one line (which
    directory would be meant is ambiguous). The same directory, spelled otherwise, is fine."""
    copy = tmp_path / "copy"
    shutil.copytree(fake_run, copy)
    refused(capsys, tmp_path, ["run", str(copy / "config.yaml"), f"run_dir={fake_run}", "--overwrite"],
            f"is the config of the run in {copy}: it runs there, not in run_dir=", max_len=800)
    assert load_config(str(copy / "config.yaml"), [f"run_dir={copy}/"]).run_dir == str(copy)
    with pytest.raises(ConfigError, match="copy the file out of the run directory first"):
        load_config(str(copy / "config.yaml"), [f"run_dir={tmp_path / 'new'}"])


def test_dumped_config_has_no_aliases_and_reads_back():
    """The loader refuses aliases, so the dumper must never write one (a shared list would be)."""
    from raysub.config import Config, _Dumper, load_yaml

    shared = [1, 2]
    text = yaml.dump({"a": shared, "b": shared}, Dumper=_Dumper)
    assert "&" not in text and load_yaml(text) == {"a": [1, 2], "b": [1, 2]}
    cfg = load_config(None, ["sgd.lr_milestones=[3]", "train.lr_milestones=[3]"])
    assert Config.from_dict(load_yaml(cfg.to_yaml())) == cfg


@pytest.mark.system  # moto's S3 server
def test_a_moved_runs_config_on_object_storage(fake_run):
    """The same on S3 (moto's loopback server): the run is where config.yaml was read, its URI query kept."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] runs the S3 server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="hardening")
        for name in ("config.yaml", "manifest.json"):
            client.upload_file(str(fake_run / name), "hardening", f"moved/{name}")
        query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        cfg = load_config(f"s3://hardening/moved/config.yaml{query}")
        assert cfg.run_dir == f"s3://hardening/moved{query}"
        with pytest.raises(ConfigError, match="it runs there, not in run_dir="):
            load_config(f"s3://hardening/moved/config.yaml{query}", [f"run_dir=s3://hardening/elsewhere{query}"])
    finally:
        server.stop()


@pytest.mark.parametrize("override", ["train.projection_options={1: a, b: c}", "model.options={true: 1}",
                                      "train.optimizer_options={null: 1}"])
def test_an_option_mapping_needs_names_as_keys(tmp_path, capsys, override):
    """`{1: a, b: c}` crashed the option check (sorting int and str keys: TypeError, exit 1). Catches: a
    free-form mapping's keys not checked against its Dict[str, Any] annotation."""
    refused(capsys, tmp_path, ["run", override, f"run_dir={tmp_path}/r"], "is not a name: quote it")
