"""Launch a training run on every worker of a Cloud TPU VM slice (the same config as CPU and GPU).

    python launch/tpu.py --tpu my-v5p-16 --zone us-east5-a --num_workers 2 \\
        --config=experiments/configs/g2rpo.py:qwen3_8b_math,g2rpo_a \\
        --config.model.checkpoint=/mnt/ckpt/Qwen3-8B --config.run.workdir=/mnt/runs/qwen3_8b_math/g2rpo_a
    python launch/tpu.py --dry_run ...   # print every gcloud command; run nothing

Steps, each a gcloud command printed before it runs:
  1. reuse the slice, starting it if it is stopped, or create it when --accelerator_type (and
     --runtime_version) are given and it does not exist;
  2. sync this working tree (without .git, .venv and runs/) to --remote_dir on every worker;
  3. create the venv with jax[tpu] on every worker unless it exists (--no_setup skips it);
  4. run the same train command on every worker with --config.mesh.distributed=True (JAX finds
     its peers from the TPU metadata), streaming each worker's output here as `[worker i] ...`
     and into runs/launch/TPU-worker-i.log; without --num_workers one `--worker=all` ssh runs it;
  5. --after keep (default) leaves the slice running for the next run; stop or delete end it.
The checkpoint, data and run directory must be on storage every worker sees (a mounted bucket or
NFS). An interrupted run resumes from its last checkpoint when the same command is run again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # noqa: E402

LAUNCHER = "launch/tpu.py"
ARCHIVE = "/tmp/g2rpo-jax.tgz"  # on this machine and on every worker
EXCLUDED = ("./.git", "./.venv", "./runs", "__pycache__", "*.egg-info")  # tar patterns, from the root


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, str, list[str]]:
    parser = argparse.ArgumentParser(prog=LAUNCHER, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="name of the TPU VM slice")
    parser.add_argument("--zone", required=True, help="its zone, e.g. us-east5-a")
    parser.add_argument("--project", default="", help="Google Cloud project ('' = gcloud's default)")
    parser.add_argument("--accelerator_type", default="",
                        help="e.g. v5p-16: create the slice with it when it does not exist")
    parser.add_argument("--runtime_version", default="", help="TPU VM image for creation, e.g. v2-alpha-tpuv5")
    parser.add_argument("--spot", action="store_true", help="create a Spot slice")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="hosts of the slice: one ssh per worker, each streamed with its label "
                             "(0 = one `--worker=all` ssh)")
    parser.add_argument("--remote_dir", default="~/g2rpo-jax", help="the repository's copy on every worker")
    parser.add_argument("--log_dir", default="runs/launch", help="local folder of the workers' logs")
    parser.add_argument("--after", choices=("keep", "stop", "delete"), default="keep",
                        help="what happens to the slice when the run ends")
    parser.add_argument("--no_sync", action="store_true", help="do not copy this working tree to the workers")
    launchlib.add_common_flags(parser)
    args, extra = parser.parse_known_args(argv)
    if args.num_workers < 0:
        raise launchlib.LaunchError(LAUNCHER, f"--num_workers={args.num_workers} must be >= 0")
    if bool(args.accelerator_type) != bool(args.runtime_version):
        raise launchlib.LaunchError(LAUNCHER, "--accelerator_type and --runtime_version go together (both are "
                                              "needed to create a slice; give neither to reuse one)")
    config, overrides = launchlib.split_config_args(LAUNCHER, extra)
    launchlib.check_train_config(LAUNCHER, config, overrides)
    return args, config, overrides


def location(args: argparse.Namespace) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB TPU ... --zone=ZONE [--project=P]`."""
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.tpu, *rest, *location(args)]


def ssh(args: argparse.Namespace, worker: str, remote: str) -> list[str]:
    return gcloud(args, "ssh", f"--worker={worker}", f"--command={remote}")


def remote_path(path: str) -> str:
    """A path for the worker's shell: quoted, except a leading ~/ that the shell must expand."""
    return ("~/" + shlex.quote(path[2:])) if path.startswith("~/") else shlex.quote(path)


def remote_shell(args: argparse.Namespace, command: str) -> str:
    """`cd REMOTE_DIR && COMMAND` on a worker."""
    return f"cd {remote_path(args.remote_dir)} && {command}"


def ensure_slice(shell: launchlib.Shell, args: argparse.Namespace) -> None:
    """Reuses the slice (starting it if stopped) or creates it."""
    create = gcloud(args, "create", f"--accelerator-type={args.accelerator_type}",
                    f"--version={args.runtime_version}", *(["--spot"] if args.spot else []))
    described = shell.run(gcloud(args, "describe", "--format=value(state)"), capture=True, check=False,
                          note="reuse the slice if it exists")
    if shell.dry_run:
        if args.accelerator_type:
            shell.echo("+ " + shlex.join(create) + "    # only if the slice does not exist")
        shell.echo("+ " + shlex.join(gcloud(args, "start")) + "    # only if the slice is stopped")
        return
    if described.returncode != 0:
        if not args.accelerator_type:
            raise launchlib.LaunchError(LAUNCHER, f"TPU {args.tpu!r} was not found in {args.zone} "
                                                  f"({described.stderr.strip()[-300:]}); pass --accelerator_type and "
                                                  "--runtime_version to create it")
        shell.run(create)
    elif described.stdout.strip() in ("STOPPED", "STOPPING"):
        shell.run(gcloud(args, "start"))


def sync_code(shell: launchlib.Shell, args: argparse.Namespace) -> None:
    excludes = [f"--exclude={pattern}" for pattern in EXCLUDED]
    shell.run(["tar", "-czf", ARCHIVE, *excludes, "-C", launchlib.REPO, "."], note="pack this working tree")
    shell.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.tpu}:{ARCHIVE}", "--worker=all",
               *location(args)])
    directory = remote_path(args.remote_dir)
    shell.run(ssh(args, "all", f"mkdir -p {directory} && tar -xzf {ARCHIVE} -C {directory}"))


def run_training(shell: launchlib.Shell, args: argparse.Namespace, train: Sequence[str]) -> int:
    remote = remote_shell(args, shlex.join(train))
    if not args.num_workers:
        result = shell.run(ssh(args, "all", remote), check=False)
        return 0 if result is None else result.returncode
    workers = range(args.num_workers)
    statuses = shell.run_parallel(
        [ssh(args, str(i), remote) for i in workers], [f"worker {i}" for i in workers],
        [os.path.join(launchlib.REPO, args.log_dir, f"{args.tpu}-worker-{i}.log") for i in workers])
    failed = [i for i, status in zip(workers, statuses) if status != 0]
    if failed:
        shell.echo(f"{LAUNCHER}: workers {failed} exited with an error; see {args.log_dir}/{args.tpu}-worker-*.log")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args, config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    shell = launchlib.Shell(LAUNCHER, args.dry_run)
    if not args.dry_run:
        launchlib.require_tools(LAUNCHER, {"gcloud": "the Google Cloud CLI, cloud.google.com/sdk",
                                           **({} if args.no_sync else {"tar": "to pack the working tree"})})
    ensure_slice(shell, args)
    if not args.no_sync:
        sync_code(shell, args)
    if not args.no_setup:
        shell.run(ssh(args, "all", remote_shell(args, launchlib.setup_script("tpu"))),
                  note="create the venv on every worker if it is missing")
    status = run_training(shell, args, launchlib.train_command(config, overrides, distributed=True))
    if args.after != "keep":
        shell.run(gcloud(args, args.after, *(["--quiet"] if args.after == "delete" else [])))
    return status


if __name__ == "__main__":
    sys.exit(launchlib.run_main(main))
