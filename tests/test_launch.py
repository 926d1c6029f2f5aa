"""launch/: dry runs of the TPU pod and GPU/SLURM launchers print every command, the same train
command and overrides on every host, and the distributed settings; mistakes stop with the fix."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from tests import stand_in


def load_launcher(name: str):
    """launch/<name>.py as a module (launch/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(stand_in.REPO, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu, tpu, launchlib = load_launcher("gpu"), load_launcher("tpu"), load_launcher("launchlib")

RUN = ["--config=experiments/configs/g2rpo.py:qwen3_8b_math,g2rpo_a", "--config.model.checkpoint=/mnt/ckpt/Qwen3-8B",
       "--config.run.workdir=/mnt/runs/8b g2rpo_a", "--config.guidance.alpha=0.5"]
EXPECTED_TRAIN = [".venv/bin/python", "-m", "g2rpo_jax.train", RUN[0], "--config.mesh.distributed=True", *RUN[1:]]


def dry_run(main, argv, capsys) -> list[str]:
    assert main([*argv, "--dry_run"]) == 0
    return capsys.readouterr().out.splitlines()


def tpu_worker_commands(lines) -> dict[str, list[str]]:
    """{'worker 0': train argv, ...}: the command each worker's ssh runs, after `cd <dir> &&`."""
    commands = {}
    for line in lines:
        if line.startswith("+ [worker "):
            label, ssh = line[3:].split("] ", 1)
            remote = next(a for a in shlex.split(ssh) if a.startswith("--command="))[len("--command="):]
            directory, command = remote.split(" && ", 1)
            assert directory == "cd ~/g2rpo-jax"
            commands[label] = shlex.split(command)
    return commands


def slurm_train_command(lines) -> list[str]:
    srun = next(line for line in lines if line.startswith("srun "))
    words = shlex.split(srun)
    return words[words.index(".venv/bin/python"):]


def test_tpu_slice_and_slurm_job_run_the_same_train_command(capsys):
    tpu_lines = dry_run(tpu.main, ["--tpu", "pod-1", "--zone", "us-east5-a", "--num_workers", "2",
                                   "--accelerator_type", "v5p-16", "--runtime_version", "v2-alpha-tpuv5", *RUN], capsys)
    workers = tpu_worker_commands(tpu_lines)
    assert workers == {"worker 0": EXPECTED_TRAIN, "worker 1": EXPECTED_TRAIN}
    assert any("--worker=0" in line for line in tpu_lines) and any("--worker=1" in line for line in tpu_lines)
    steps = [line.split()[5] for line in tpu_lines if line.startswith("+ gcloud")]
    assert steps[:4] == ["describe", "create", "start", "scp"]  # reuse, else create; start if stopped; sync
    assert any(line.startswith("+ tar -czf") for line in tpu_lines)
    assert any("jax[tpu]==0.10.2" in line for line in tpu_lines)

    slurm_lines = dry_run(gpu.main, ["--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu",
                                     "--time", "01:00:00", *RUN], capsys)
    assert slurm_train_command(slurm_lines) == EXPECTED_TRAIN == workers["worker 0"]
    for setting in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                    "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --signal=TERM@120",
                    "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"):
        assert setting in slurm_lines
    assert slurm_lines[-1] == "+ sbatch runs/launch/g2rpo.sbatch"
    assert not os.path.exists(os.path.join(stand_in.REPO, "runs", "launch", "g2rpo.sbatch"))  # nothing written


def test_single_gpu_node_runs_without_jax_distributed_and_stops_the_slice_if_asked(capsys):
    lines = dry_run(gpu.main, RUN, capsys)
    assert shlex.split(lines[-1][2:]) == [*EXPECTED_TRAIN[:4], "--config.mesh.distributed=False", *RUN[1:]]
    assert "+ export XLA_PYTHON_CLIENT_MEM_FRACTION" in lines[-2]
    lines = dry_run(tpu.main, ["--tpu", "pod-1", "--zone", "z", "--after", "delete", "--no_sync", "--no_setup",
                               "--project", "p", *RUN], capsys)
    assert lines[-2].startswith("+ gcloud compute tpus tpu-vm ssh pod-1 --worker=all ")  # one ssh for all workers
    assert lines[-1] == "+ gcloud compute tpus tpu-vm delete pod-1 --quiet --zone=z --project=p"
    assert not any("scp" in line or "jax[tpu]" in line for line in lines)  # --no_sync, --no_setup


@pytest.mark.parametrize("argv,message", [
    ([], r"exactly one --config=\.\.\. is needed, got none"),
    ([RUN[0], "--config.run.seed", "3"], r"'--config.run.seed': write the value after '='"),
    ([RUN[0], "--workers=2"], r"unknown argument '--workers=2'"),
    (["--config=experiments/configs/nope.py:demo"], r"no config file 'experiments/configs/nope.py'"),
    ([RUN[0], "--config.mesh.distributed=False"], r"is set by the launcher"),
    (["--accelerator_type", "v5p-8", RUN[0]], r"--accelerator_type and --runtime_version go together"),
])
def test_tpu_launcher_mistakes_name_the_fix(argv, message):
    with pytest.raises(SystemExit, match=message) as raised:
        tpu.main(["--tpu", "t", "--zone", "z", *argv, "--dry_run"])
    assert raised.value.code == 2


@pytest.mark.parametrize("override,message", [
    ("--config.guidance.alpah=0.5", '--config.guidance.alpah: the config has no key \'alpah\'; did you mean "alpha"?'),
    ("--config.step.group_size=0", "step.group_size=0 is not valid; valid: an integer >= 1"),
    ("--config.step.beta=high", "--config.step.beta=high: could not convert string to float: 'high'"),
    ("--config.model.checkpoint=", "model.checkpoint is empty: pass --config.model.checkpoint="),  # a job would fail
])
def test_launchers_check_the_overrides_as_train_does_before_printing(capsys, override, message):
    from g2rpo_jax import train  # noqa: PLC0415

    program = "python -m g2rpo_jax.train"
    expected = train.check_args(program, [RUN[0], override]).removeprefix(f"{program}: ")  # what train says
    assert expected.startswith(message)
    launchers = ((gpu.main, "gpu", ["--nodes", "2"]), (tpu.main, "tpu", ["--tpu", "t", "--zone", "z"]))
    for main, name, launcher_args in launchers:
        with pytest.raises(SystemExit) as raised:
            main([*launcher_args, *RUN, override, "--dry_run"])
        assert raised.value.code == 2 and str(raised.value) == f"launch/{name}.py: {expected}"
        assert capsys.readouterr().out == ""  # stopped before the first command was printed
    result = subprocess.run([sys.executable, os.path.join(stand_in.REPO, "launch", "gpu.py"), *RUN, override,
                             "--dry_run"], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: launch/gpu.py: {expected}"  # one line, whatever the working directory


def test_missing_arguments_and_tools(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        tpu.main([RUN[0], "--dry_run"])
    assert "the following arguments are required: --tpu, --zone" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--nodes=0 and --gpus_per_node=8 must be at least 1"):
        gpu.main(["--nodes", "0", RUN[0]])
    monkeypatch.setenv("PATH", "/nonexistent")  # no gcloud, sbatch, tar or python3: found before anything runs
    with pytest.raises(SystemExit, match=r"not on PATH: gcloud \(the Google Cloud CLI.*\), tar .*--dry_run prints"):
        tpu.main(["--tpu", "t", "--zone", "z", *RUN[:2]])
    with pytest.raises(SystemExit, match=r"not on PATH: python3 \(to create the venv\), sbatch \(SLURM's client"):
        gpu.main(["--nodes", "2", *RUN[:2]])
    assert capsys.readouterr().out == ""  # nothing was run or printed before the error


def test_shell_wrappers_keep_the_old_command_lines():
    config = "experiments/configs/g2rpo.py:demo"
    for script, args in (("gpu.sh", [config]), ("tpu_pod.sh", ["pod-1", "us-east5-a", config])):
        result = subprocess.run(["bash", os.path.join(stand_in.REPO, "launch", script), *args, "--config.run.seed=3",
                                 "--dry_run", "--no_setup"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"g2rpo_jax.train --config={config} --config.mesh.distributed=" in result.stdout
        assert "--config.run.seed=3" in result.stdout
    usage = subprocess.run(["bash", os.path.join(stand_in.REPO, "launch", "tpu_pod.sh")], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_argument_errors_reach_the_terminal_with_status_2():
    """From the command line, not only to a caller catching the exception: the message is printed."""
    for script, args in (("gpu.py", ["--dry_run"]), ("tpu.py", ["--dry_run", "--tpu", "t", "--zone", "z", "--workers", "2",
                                                                "--config=experiments/configs/g2rpo.py:demo"])):
        result = subprocess.run([sys.executable, os.path.join(stand_in.REPO, "launch", script), *args],
                                capture_output=True, text=True, timeout=60, cwd=stand_in.REPO)
        assert result.returncode == 2
        assert result.stderr.startswith(f"error: launch/{script}: ") and ("--config=" in result.stderr)


def test_setup_script_creates_the_venv_only_when_missing():
    script = launchlib.setup_script("cuda12")
    assert script.startswith("(test -x .venv/bin/python || (python3 -m venv .venv && ")
    assert "'jax[cuda12]==0.10.2'" in script and script.endswith("--no-deps -e .))")
