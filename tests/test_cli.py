"""LightningCLI: every seed config runs, settings come from YAML and the command line, errors are ours."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_optims import DEFAULT_OPTIM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train import main  # noqa: E402

CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SEED_CONFIGS = {"adamw", "apollo", "apollo_mini", "grokadamw", "adalomo", "schedule_free_radam"}


def test_one_config_per_seed_example():
    assert {c.stem for c in CONFIGS} >= SEED_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_runs_through_lightning_cli(tmp_path, config):
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=3",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.limit_val_batches=2",
        ]
    )
    assert cli.trainer.global_step == 3
    spec_name = cli.model.optimizer_arguments.optim
    assert type(cli.trainer.optimizers[0]).__name__  # built from the YAML's settings
    text = config.read_text()
    if "optim:" in text:
        assert re.search(rf"optim: {spec_name}\b", text)


def test_yaml_values_reach_the_optimizer(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "examples/configs/apollo_mini.yaml"),
            "--trainer.max_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.limit_val_batches=0",
        ]
    )
    args = cli.model.optimizer_arguments
    assert args.optim_target_modules == [".*.attn.*", ".*.mlp.*"]
    assert args.parsed_optim_args["scale_type"] == "tensor" and args.parsed_optim_args["rank"] == 1
    target_group = cli.trainer.optimizers[0].param_groups[1]
    assert target_group["rank"] == 1 and target_group["scale"] == 128.0
    # the seed's regexes selected the attention and MLP projections, 7 per layer
    assert len(target_group["params"]) == 7 * cli.model.hparams.num_layers


def test_optim_args_as_a_mapping_and_command_line_override(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "examples/configs/apollo.yaml"),
            "--trainer.max_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.limit_val_batches=0",
            '--model.optim_args={"rank": 2, "scale_type": "tensor"}',
        ]
    )
    assert cli.model.optimizer_arguments.parsed_optim_args["rank"] == 2
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "examples/configs/adamw.yaml"),
            "--trainer.max_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.limit_val_batches=0",
            "--model.optim=grokadamw",
        ]
    )
    assert type(cli.trainer.optimizers[0]).__name__ == "GrokAdamW"


def test_help_lists_settings_defaults_and_names(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lm.CausalLM"])
    out = capsys.readouterr().out
    for text in (
        "--model.optim OPTIM",
        f"default: {DEFAULT_OPTIM}",  # (transformers' default for the installed torch: fused from torch 2.8)
        "--model.optim_target_modules",
        "--model.max_grad_norm",
        "default: 1.0",
        "apollo_adamw",
        "schedule_free_radam",
        "adalomo",
    ):
        assert text in out, text


def test_bad_value_fails_with_our_message(capsys):
    with pytest.raises((SystemExit, ValueError)) as info:  # the CLI exits; given args= it raises instead
        main(
            [
                "fit",
                "--config",
                str(ROOT / "examples/configs/apollo_mini.yaml"),
                "--model.optim_args=proj=random,rank=1,scaletype=tensor",
            ]
        )
    text = capsys.readouterr().err + str(info.value)
    assert "unknown key 'scaletype' for apollo_adamw" in text and "did you mean 'scale_type'" in text


def test_lightning_cli_optimizer_flag_is_refused(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="--optimizer"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "examples/configs/adamw.yaml"),
                "--trainer.max_steps=1",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--optimizer=torch.optim.SGD",
                "--optimizer.lr=0.1",
            ]
        )


def readme_command(step: str) -> str:
    """The README's set-up command for a step ("main job" or "tests"): a line of its first bash block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1).strip().splitlines()
    assert len(block) == 2, "the README's front page gives two set-up commands"
    return dict(zip(("main job", "tests"), block))[step]


@pytest.mark.slow
def test_readme_main_job_command_works_as_written(tmp_path):
    install, run = (part.strip() for part in readme_command("main job").split("&&"))
    assert install.startswith("pip install torch==2.13.0 -e") and "[examples]" in install
    command = shlex.split(run)
    assert command[:2] == ["python", "examples/train.py"]
    proc = subprocess.run(
        [sys.executable, *command[1:], "--trainer.max_steps=5", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = re.search(r"^logs: (.+)$", proc.stdout, re.M)
    assert logs and Path(logs.group(1), "metrics.csv").exists()
    assert "train_loss" in (Path(logs.group(1)) / "metrics.csv").read_text()


def test_readme_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_command("tests").replace("pip install", "pip install -q") in ci
    install, run = (part.strip() for part in readme_command("main job").split("&&"))
    assert install.replace("pip install", "pip install -q") in ci and run in ci


def test_migration_example():
    from migrate import main as migrate

    model = migrate(max_steps=2)
    args = model.optimizer_arguments
    assert args.optim == "apollo_adamw" and args.parsed_optim_args["rank"] == 1
    assert model.trainer.global_step == 2


# what a newcomer must not see on the first screen: upstream import noise (torchao's CUDA kernels and torch's pytree
# note when transformers imports torchao; bitsandbytes' kernels-hub fallback), a progress bar counting to epoch -2
NOISE = re.compile(r"Failed to load|is an Enum subclass|kernels-community|Epoch \d+/-\d|Traceback")


def _first_screen(args: list[str], tmp_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["fit", "--help"], ["fit", "--config", "adamw.yaml", "--print_config"]], ids=["help", "print_config"]
)
def test_help_and_print_config_open_without_noise(tmp_path, args):
    args = [str(ROOT / "examples" / "configs" / a) if a.endswith(".yaml") else a for a in args]
    out = _first_screen(args, tmp_path)
    assert NOISE.search(out) is None, NOISE.search(out)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_every_config_trains_without_noise_on_the_first_screen(tmp_path, config):
    """The example as a newcomer runs it (a short run, the progress bar on): no upstream noise, no negative epoch
    count (Rich's bar shows max_epochs - 1, which is -2 when max_steps ends training)."""
    out = _first_screen(
        ["fit", "--config", str(config), "--trainer.max_steps=3", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        tmp_path,
    )
    assert "logs: " in out
    assert NOISE.search(out) is None, (NOISE.search(out), out[-2000:])
