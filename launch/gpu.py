"""Launch a training run on the GPUs of this machine, or on several nodes under SLURM.

    python launch/gpu.py --config=experiments/configs/g2rpo.py:qwen3_1_7b_math,g2rpo_a \\
        --config.model.checkpoint=/ckpt/Qwen3-1.7B
    python launch/gpu.py --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \\
        --config=experiments/configs/g2rpo.py:qwen3_8b_math,g2rpo_a --config.model.checkpoint=/ckpt/Qwen3-8B
    python launch/gpu.py --dry_run ...   # print every command and the batch script; run nothing

One node (the default) runs the train command here, with all of the node's GPUs in one process.
With --nodes N > 1 the launcher writes a batch script to LOG_DIR/NAME.sbatch and submits it with
sbatch: one task per node (`srun --ntasks-per-node=1`), each driving all of its node's GPUs, and
`--config.mesh.distributed=True` so that jax.distributed.initialize() takes the process count,
rank and coordinator from SLURM. JAX_LOCAL_DEVICE_IDS names every GPU of the node, because JAX's
SLURM detection would otherwise give each process only the GPU of its local rank. The run
directory, checkpoint and data must be on storage every node sees. SLURM sends SIGTERM two
minutes before the time limit; the run saves its step and the same command resumes it.

The venv (`.venv` with jax[cuda12]) is created here first if it is missing (--no_setup skips it).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # noqa: E402

LAUNCHER = "launch/gpu.py"
MEMORY_FRACTION = "0.9"  # of each GPU's memory XLA may take (KV cache and activations)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, str, list[str]]:
    parser = argparse.ArgumentParser(prog=LAUNCHER, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="nodes; > 1 submits a SLURM job")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs of each node (SLURM jobs)")
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--account", default="", help="SLURM account")
    parser.add_argument("--time", default="", help="SLURM time limit, e.g. 24:00:00")
    parser.add_argument("--job_name", default="g2rpo", help="SLURM job name (and batch script name)")
    parser.add_argument("--log_dir", default="runs/launch", help="where the batch script and job logs go")
    launchlib.add_common_flags(parser)
    args, extra = parser.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise launchlib.LaunchError(LAUNCHER, f"--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} "
                                              "must be at least 1")
    config, overrides = launchlib.split_config_args(LAUNCHER, extra)
    launchlib.check_train_config(LAUNCHER, config, overrides)
    return args, config, overrides


def batch_script(args: argparse.Namespace, train: Sequence[str]) -> str:
    """The sbatch script of a multi-node run."""
    options = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={args.gpus_per_node}", f"--output={args.log_dir}/%x-%j.out",
               "--signal=TERM@120"]
    options += [f"--{key}={value}" for key, value in
                (("partition", args.partition), ("account", args.account), ("time", args.time)) if value]
    devices = ",".join(str(i) for i in range(args.gpus_per_node))
    return "\n".join([
        "#!/bin/bash",
        *[f"#SBATCH {option}" for option in options],
        "set -euo pipefail",
        f"cd {shlex.quote(launchlib.REPO)}",
        f"export XLA_PYTHON_CLIENT_MEM_FRACTION=${{XLA_PYTHON_CLIENT_MEM_FRACTION:-{MEMORY_FRACTION}}}",
        "# one process per node drives all of its GPUs; JAX reads ranks and the coordinator from SLURM",
        f"export JAX_LOCAL_DEVICE_IDS={devices}",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 " + shlex.join(train),
        "",
    ])


def launch_single_node(shell: launchlib.Shell, train: Sequence[str]) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEMORY_FRACTION)
    shell.echo(f"+ export XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']}")
    result = shell.run(train, check=False)
    return 0 if result is None else result.returncode


def launch_slurm(shell: launchlib.Shell, args: argparse.Namespace, train: Sequence[str]) -> int:
    script_path = os.path.join(args.log_dir, f"{args.job_name}.sbatch")
    shell.write(os.path.join(launchlib.REPO, script_path), batch_script(args, train))
    result = shell.run(["sbatch", script_path], capture=True)
    if result is not None:
        shell.echo(result.stdout.strip())
        match = re.search(r"(\d+)\s*$", result.stdout.strip())
        job = match.group(1) if match else "<job id>"
        shell.echo(f"logs: {args.log_dir}/{args.job_name}-{job}.out (tail -F it to follow the run)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    shell = launchlib.Shell(LAUNCHER, args.dry_run)
    multi_node = args.nodes > 1
    if not args.dry_run:
        tools = {"python3": "to create the venv"} if not args.no_setup else {}
        if multi_node:
            tools["sbatch"] = "SLURM's client, on the cluster's login node"
        launchlib.require_tools(LAUNCHER, tools)
    if not args.no_setup:
        shell.run(["bash", "-c", launchlib.setup_script("cuda12")], note="create the venv if it is missing")
    train = launchlib.train_command(config, overrides, distributed=multi_node)
    if multi_node:
        return launch_slurm(shell, args, train)
    return launch_single_node(shell, train)


if __name__ == "__main__":
    sys.exit(launchlib.run_main(main))
