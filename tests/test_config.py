"""Config loading: layers, overrides, and the errors a user sees for a typo."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import yaml

from common.errors import UserError, user_message
from tests.conftest import run_command
from train.config import CONFIG_DIR, available, load_config, save_config
from train.distributed import dynamo_plugin, full_fp32

ENSEMBLE_ARCHS = {
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "dsk_resnext101_32x4d",
    "resnet152",
    "seresnet152",
}


def test_layers_apply_in_order_data_then_model_then_command_line():
    cfg = load_config("effnet_b7", ["epochs=2", "lr=0.01", "data=fashion50", "seed=5"])
    assert cfg["arch"] == "efficientnet_b7"  # model layer
    assert cfg["num_classes"] == 10  # data layer chosen on the command line
    assert cfg["img_size"] == 448  # model layer beats the data layer
    assert (cfg["epochs"], cfg["lr"], cfg["seed"]) == (2, 0.01, 5)
    assert cfg["name"] == "effnet_b7"


def test_every_run_accepts_the_common_overrides():
    cfg = load_config(
        "effnet_b2_ablation", ["data=fashion50", "epochs=1", "seed=3", "batch_size=8", "out_dir=/x"]
    )
    assert (cfg["epochs"], cfg["seed"], cfg["batch_size"], cfg["out_dir"]) == (1, 3, 8, "/x")


def test_string_keys_keep_yaml_1_1_booleans_as_text():
    cfg = load_config("effnet_b7", ["mixed_precision=no", "auto_augment=null"])
    assert cfg["mixed_precision"] == "no"
    assert cfg["auto_augment"] is None


def test_lists_and_ints_for_floats_parse():
    cfg = load_config("effnet_b7", ["train_splits=[train]", "lr=1"])
    assert cfg["train_splits"] == ["train"] and cfg["lr"] == 1.0


def test_exponent_floats_without_a_dot_parse_on_the_command_line_and_in_a_file(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; the configs read it as Python and YAML 1.2 do.
    model = tmp_path / "mine.yaml"
    model.write_text("arch: resnet18\ndata: fashion50\nweight_decay: 5E-5\n")
    cfg = load_config(str(model), ["lr=1e-3", "rrc_scale=[8e-2, 1]"])
    assert (cfg["lr"], cfg["weight_decay"], cfg["rrc_scale"]) == (0.001, 5e-5, [0.08, 1])


def test_a_name_stays_text_and_a_saved_config_reads_back_the_same(tmp_path):
    from common.yamlio import dump_yaml, load_yaml

    cfg = load_config("demo_resnet18", ["name=1e5", "lr=1e-3"])
    assert (cfg["name"], load_config("demo_resnet18", ["name=2024"])["name"]) == ("1e5", "2024")
    assert load_yaml(dump_yaml(cfg)) == cfg  # '1e5' quoted, not read back as 100000.0


def test_unknown_key_is_refused_with_the_valid_keys():
    with pytest.raises(UserError, match=r"unknown config key learning_rate; valid keys: .*\blr\b"):
        load_config("effnet_b7", ["learning_rate=0.1"])


def test_wrong_type_is_refused():
    with pytest.raises(UserError, match=r"epochs='ten' is a str, expected a int"):
        load_config("effnet_b7", ["epochs=ten"])


def test_compile_takes_a_bool_or_the_cuda_graph_mode_and_refuses_other_words():
    assert load_config("effnet_b7", ["compile=reduce-overhead"])["compile"] == "reduce-overhead"
    assert load_config("effnet_b7", ["compile=true"])["compile"] is True
    expected = r"compile='fast' is a str, expected a bool like False or 'reduce-overhead'$"
    with pytest.raises(UserError, match=expected):
        load_config("effnet_b7", ["compile=fast"])


@pytest.mark.parametrize(
    "value, backend, mode",
    [
        (False, "NO", "default"),
        (True, "INDUCTOR", "default"),
        ("reduce-overhead", "INDUCTOR", "reduce-overhead"),
    ],
)
def test_compile_picks_accelerates_dynamo_backend_and_mode(value, backend, mode):
    plugin = dynamo_plugin(value)
    assert (plugin.backend.name, plugin.mode) == (backend, mode)


def test_cuda_graphs_are_refused_with_gradient_accumulation_and_inductor_is_not():
    with pytest.raises(UserError, match=r"reduce-overhead with grad_accum=2: .*compile=true"):
        dynamo_plugin("reduce-overhead", grad_accum=2)
    assert dynamo_plugin(True, grad_accum=2).mode == "default"


def test_full_fp32_turns_tf32_off_through_the_flags_inductor_reads():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        full_fp32()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        # What the newer API (and the convolutions) then see: no TF32 anywhere.
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown model 'effnet_b9'.*valid: .*effnet_b7"):
        load_config("effnet_b9")


def test_the_paper_ensemble_has_sixteen_configs_of_six_architectures_on_train_and_val():
    members = [load_config(m) for m in available("models") if m.split("_")[0] != "demo"]
    final = [c for c in members if c["train_splits"] == ["train", "val"]]
    assert len(final) == 16
    assert {c["arch"] for c in final} == ENSEMBLE_ARCHS
    assert len({(c["arch"], c["seed"], c["img_size"]) for c in final}) == 16
    assert all(c["img_size"] >= 448 and c["holdout_per_class"] > 0 for c in final)


def test_config_errors_exit_2_with_one_line_through_the_command():
    proc = run_command("-m", "train", "effnet_b7", "epochz=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown config key epochz" in proc.stderr
    proc = run_command("-m", "train", "no_such_model", check=False)
    assert proc.returncode == 2 and "unknown model 'no_such_model'" in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epochs=-1"], "command line: epochs=-1 must be at least 1"),
        (["epochs=0", "ema_horizon=null"], "command line: epochs=0 must be at least 1"),
        (["epochs=null"], "command line: epochs=null needs a value at least 1"),
        (["batch_size=0"], "command line: batch_size=0 must be at least 1"),
        (["keep_last=0"], "command line: keep_last=0 must be at least 1"),
        (["keep_last=-3"], "command line: keep_last=-3 must be at least 1"),
        (["grad_accum=0"], "command line: grad_accum=0 must be at least 1"),
        (["img_size=0"], "command line: img_size=0 must be at least 1"),
        (["ema_horizon=0"], "command line: ema_horizon=0.0 must be greater than 0"),
        (["ema_decay=1"], "command line: ema_decay=1.0 must be in [0, 1)"),
        (["lr=-0.1"], "command line: lr=-0.1 must be greater than 0"),
        (["mix_prob=1.5"], "command line: mix_prob=1.5 must be in [0, 1]"),
        (["stop_timeout_s=0"], "command line: stop_timeout_s=0 must be greater than 0"),
        (
            ["rrc_scale=[1.0,0.5]"],
            "command line: rrc_scale=[1.0, 0.5] must be two numbers [low, high]",
        ),
        (
            ["std=[0.2,0,0.2]"],
            "command line: std=[0.2, 0, 0.2] must be three numbers (R, G, B), each greater",
        ),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key_through_the_command(overrides, message):
    proc = run_command("-m", "train", "demo_resnet18", *overrides, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {message}")
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sched=cosin",
            "sched='cosin' must be one of cosine, tanh, step, multistep, poly, constant, rsqrt",
        ),
        ("interpolation=cubic", "interpolation='cubic' must be one of bicubic, bilinear, nearest"),
        ("remode=noise", "remode='noise' must be one of pixel, rand, const"),
        ("mixed_precision=fp8", "mixed_precision='fp8' must be one of auto, no, bf16, fp16"),
        ("name=..", "name='..' must be one folder name (no /, not . or ..): the run's folder"),
        ("name=a/b", "name='a/b' must be one folder name"),
        ("channels_last=maybe", "channels_last='maybe' must be true, false or null"),
        ("channels_last=0.5", "channels_last=0.5 must be true, false or null"),
    ],
)
def test_a_word_outside_its_keys_choices_or_a_name_leaving_out_dir_is_refused(override, message):
    with pytest.raises(UserError, match=f"^command line: {re.escape(message)}"):
        load_config("demo_resnet18", [override])


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("null", None)])
def test_a_switch_decided_by_the_device_takes_true_false_or_null(text, value):
    assert load_config("demo_resnet18", [f"channels_last={text}"])["channels_last"] is value


@pytest.mark.parametrize(
    ("module", "argv", "problem"),
    [
        ("ensemble.blend", ["--models", "a", "--name", "../up"], "argument --name: '../up' must"),
        ("ensemble.blend", ["--models", "a", "--name", "/tmp/x"], "argument --name: '/tmp/x' must"),
        ("ensemble.logits", ["demo_resnet18", "--batch-size", "0"], "argument --batch-size: '0'"),
        ("ensemble.blend", ["--models", "a", "--min-gain", "-5"], "argument --min-gain: '-5' must"),
    ],
)
def test_command_line_names_and_counts_are_checked_by_the_parser(module, argv, problem, capsys):
    parse_args = importlib.import_module(module).parse_args
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2 and problem in capsys.readouterr().err


def test_a_model_file_path_is_read_whatever_its_suffix_case_or_named_when_missing(tmp_path):
    model = tmp_path / "Mine.YAML"
    model.write_text("arch: resnet18\ndata: fashion50\n")
    assert load_config(str(model))["name"] == "Mine"
    with pytest.raises(UserError, match=f"^model config {tmp_path}/gone.yaml does not exist"):
        load_config(str(tmp_path / "gone.yaml"))


def test_a_dataset_config_may_be_a_path_and_its_values_are_blamed_on_it(tmp_path):
    data = tmp_path / "flowers.yml"
    data.write_text("data_dir: data/flowers\nnum_classes: 0\n")
    with pytest.raises(UserError, match=rf"^{data}: num_classes=0 must be at least"):
        load_config("effnet_b7", [f"data={data}"])
    with pytest.raises(UserError, match=f"^dataset config {tmp_path}/gone.yaml does not exist"):
        load_config("effnet_b7", [f"data={tmp_path / 'gone.yaml'}"])


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("data_dir=", "command line: data_dir=null needs a value (it is empty or null)"),
        ("out_dir=", "command line: out_dir=null needs a value"),
        ("arch=", "command line: arch=null needs a value"),
        ("tracker_project=", "command line: tracker_project=null needs a value"),
        ("data=", "dataset (empty) is neither a name in configs/data/ nor a .yaml path"),
        ("seed=100000000000000000000000", "command line: seed=100000000000000000000000 must be"),
        ("seed=18446744073709551616", "command line: seed=18446744073709551616 must be"),
        ("seed=1" + "0" * 400, "command line: seed=1000"),
    ],
)
def test_an_empty_override_from_an_unset_variable_or_a_huge_seed_is_one_line(override, problem):
    with pytest.raises(UserError) as err:
        load_config("demo_resnet18_w16", [override])
    assert str(err.value).startswith(problem)
    off = ["auto_augment=", "log_with=", "arch_kwargs=", "compile=", "seed=18446744073709551615"]
    cfg = load_config("demo_resnet18_w16", off)
    assert cfg["auto_augment"] is cfg["log_with"] is cfg["compile"] is None  # null: off


@pytest.mark.parametrize("value", ["null", "5", "[a]"])
def test_a_data_key_that_is_no_name_is_one_line(tmp_path, value):
    model = tmp_path / "mine.yaml"
    model.write_text(f"arch: resnet18\ndata: {value}\n")
    with pytest.raises(UserError, match="is neither a name in configs/data/ nor a .yaml path"):
        load_config(str(model))


def test_a_saved_run_config_does_not_read_its_dataset_file_again(tmp_path):
    data = tmp_path / "flowers.yaml"
    data.write_text("data_dir: data/flowers\nnum_classes: 17\n")
    cfg = load_config("effnet_b7", [f"data={data}"])
    saved = tmp_path / "run" / "config.yaml"
    saved.parent.mkdir()
    save_config(cfg, saved)
    data.unlink()  # moved or deleted after training: every value is in the run's config
    assert load_config(str(saved)) == cfg


def test_a_value_from_a_model_file_is_blamed_on_that_file(tmp_path):
    model = tmp_path / "mine.yaml"
    model.write_text("arch: resnet18\ndata: fashion50\nbatch_size: 0\n")
    with pytest.raises(UserError, match=rf"^model config {model}: batch_size=0 must be at least 1"):
        load_config(str(model))


def test_every_shipped_config_is_in_range():
    for name in available("models"):
        for data in available("data"):
            load_config(name, ["data=" + data])


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("arch: resnet18\ndata: fashion50\n  seed: 0\n", "line 3, column 7", "mapping values"),
        ("arch: [resnet18\n", "line 2, column 1", "expected ',' or ']'"),
    ],
)
def test_a_yaml_syntax_error_names_the_file_and_line_in_one_line(tmp_path, text, where, problem):
    model = tmp_path / "broken.yaml"
    model.write_text(text)
    proc = run_command("-m", "train", str(model), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {model}, {where}: invalid YAML (")
    assert problem in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_a_user_error_of_several_lines_is_joined_not_cut():
    assert user_message(UserError("first line\n  second line\n")) == "first line second line"


# A handler registered before the command's runs after it (atexit is last in, first out).
FROZEN_AT_EXIT = """
import atexit, gc
atexit.register(lambda: print("at exit", gc.get_freeze_count() > 0))
from common.errors import cli_main
cli_main(lambda: 0)()
print("during the command", gc.get_freeze_count() > 0)
"""


def test_a_command_s_process_ends_without_python_s_final_garbage_collections():
    """Its objects are frozen once it ends (the exit frees them), not while it runs."""
    lines = run_command("-c", FROZEN_AT_EXIT).stdout.splitlines()
    assert lines == ["during the command False", "at exit True"]


def test_the_config_command_prints_the_papers_forms_for_effnet_b7():
    proc = run_command("-m", "train.config", "effnet_b7")
    printed = yaml.safe_load(proc.stdout)
    assert printed == load_config("effnet_b7")
    forms = {key: printed[key] for key in ("cr_similarity", "cr_space", "mt_direction")}
    assert forms == {"cr_similarity": "dot", "cr_space": "probs", "mt_direction": "student_teacher"}
    assert printed["drop_path_rate"] == 0.0 and printed["ema_decay"] == 0.9998
    other = yaml.safe_load(
        run_command("-m", "train.config", "effnet_b7", "cr_similarity=cosine").stdout
    )
    assert other["cr_similarity"] == "cosine"
    proc = run_command("-m", "train.config", "effnet_b7", "cr_normalize=true", check=False)
    assert proc.returncode == 2 and "unknown config key cr_normalize" in proc.stderr


def test_every_recipe_key_of_base_yaml_says_whether_the_paper_or_we_chose_it():
    """A key's comment (its line and the indented lines under it) names its source."""
    infrastructure = {
        "name",
        "data",
        "data_dir",
        "out_dir",
        "logits_dir",
        "workers",
        "mean",
        "std",
        "channels_last",
        "eval_every",
        "ckpt_every_steps",
        "keep_last",
        "max_nonfinite",
        "allow_config_change",
        "stop_timeout_s",
        "log_with",
        "log_every_steps",
        "tracker_project",
    }
    lines = (CONFIG_DIR / "base.yaml").read_text().splitlines()
    comments: dict[str, str] = {}
    key = None
    for line in lines:
        if line and not line.startswith((" ", "#")):
            key = line.split(":")[0]
            comments[key] = line.partition("#")[2]
        elif key and line.startswith(" ") and "#" in line:
            comments[key] += line.partition("#")[2]
    assert set(comments) == set(load_config("effnet_b7"))
    unlabelled = [
        k
        for k, text in comments.items()
        if k not in infrastructure and "paper" not in text and "ours" not in text
    ]
    assert unlabelled == []
    assert "ours" in comments["ema_decay"] and "paper gives no eta" in comments["ema_decay"]
    for key in ("opt_eps", "lr_base_batch", "mix_prob", "fusion_fallback"):
        assert "ours" in comments[key], key


def test_workers_auto_takes_the_measured_cpu_value_on_a_cpu_and_the_cores_per_gpu_on_a_gpu(
    monkeypatch,
):
    import train.data as data
    import train.distributed as distributed

    assert load_config("effnet_b7")["workers"] == "auto"  # every config's default
    assert data.loader_workers(load_config("demo_resnet18")) == 1  # cpu_workers, 2 cores
    assert data.loader_workers(load_config("demo_resnet18_w16")) == 0  # the demo's members
    assert data.loader_workers(load_config("demo_resnet18", ["workers=3"])) == 3
    monkeypatch.setattr(data.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two GPU processes share the 16 cores
    assert data.loader_workers(load_config("effnet_b7")) == 7  # 8 each, one for the process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data.loader_workers(load_config("effnet_b7")) == 15
    with pytest.raises(UserError, match="workers=-1"):
        load_config("demo_resnet18", ["workers=-1"])


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "400000 100000\n"}, 4),  # docker --cpus 4 (cgroup v2)
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: one whole
        ({"cpu.max": "max 100000\n"}, 16),  # no quota: the affinity mask
        ({"quota": "800000\n", "period": "100000\n"}, 8),  # cgroup v1
        ({"quota": "-1\n", "period": "100000\n"}, 16),
        ({}, 16),  # no cgroup files at all
    ],
)
def test_the_cpus_per_gpu_process_keep_within_a_containers_cpu_quota(
    tmp_path, monkeypatch, files, cpus
):
    import common.processes as processes
    import train.distributed as distributed

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    v2, v1 = (tmp_path / "cpu.max",), (tmp_path / "quota", tmp_path / "period")
    monkeypatch.setattr(processes, "CPU_QUOTA_FILES", (v2, v1))
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.cpus_per_process() == cpus
