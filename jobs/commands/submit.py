"""`lvd submit`: run any lvd command as a cluster job: on a Ray cluster (Jobs API), under Slurm (sbatch) or on
Kubernetes (a KubeRay RayJob). The wrapped command and its recipe are validated here, before anything is sent;
the job is recorded locally for `lvd jobs`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  lvd submit --backend ray --address http://127.0.0.1:8265 -- \\
      curate recipes/curation/default.yaml --set inputs=[/data/raw] --set output=/data/runs/cur1
  lvd submit --backend slurm --nodes 4 --cpus-per-node 32 --time 12:00:00 --partition cpu -- \\
      curate recipes/curation/default.yaml --set output=/shared/runs/cur1
  lvd submit --backend slurm --nodes 2 --gpus-per-node 8 --dry-run -- train recipes/train/stage2_video.yaml
  lvd submit --backend kuberay --image registry/lvd:0.1 --nodes 4 --gpus-per-node 1 --volume data:/data -- \\
      curate recipes/curation/default.yaml --set output=/data/runs/cur1

how each backend runs the command:
  ray      the current directory is uploaded as the job's working directory (without .git, .venv, caches
           and the command's output folder); Ray pipelines (curate, precompute) get --address auto and use
           the whole cluster; other commands run as the job's driver as written (train RECIPE --launcher ray
           --nproc N --address auto trains on Ray Train); outputs must be absolute paths or URLs.
  slurm    an sbatch script: curate starts a Ray cluster inside the allocation (head on the first node,
           workers on the others) and runs with its --address; train runs torchrun (or the DeepSpeed
           launcher, --launcher deepspeed) on every node via srun, rendezvous at the first node; other
           commands run once on the first node. Paths resolve from the current directory (shared fs).
  kuberay  a RayJob manifest (plus a ConfigMap with the recipe, owned by the RayJob) created with kubectl;
           the image must contain lvd; data lives on volumes (--volume CLAIM:PATH) or object storage.

Ray token authentication: to a loopback address (127.0.0.1, localhost) lvd sends ~/.ray/auth_token; for a
remote cluster set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token, or RAY_AUTH_MODE=token to send
~/.ray/auth_token there too.
Jobs are recorded under $LVD_HOME/jobs (default ~/.lvd/jobs): see `lvd jobs list`."""

# option dest -> (the backends that take it, the field of their options config)
OPTIONS = {
    "address": ({"ray"}, "address"),
    "exclude": ({"ray"}, "excludes"),
    "entrypoint_num_cpus": ({"ray"}, "entrypoint_num_cpus"),
    "entrypoint_num_gpus": ({"ray"}, "entrypoint_num_gpus"),
    "nodes": ({"slurm", "kuberay"}, "nodes"),
    "gpus_per_node": ({"slurm", "kuberay"}, "gpus_per_node"),
    "cpus_per_node": ({"slurm", "kuberay"}, "cpus_per_node"),
    "mem": ({"slurm", "kuberay"}, "mem"),
    "time": ({"slurm"}, "time"),
    "partition": ({"slurm"}, "partition"),
    "account": ({"slurm"}, "account"),
    "launcher": ({"slurm"}, "launcher"),
    "log_dir": ({"slurm"}, "log_dir"),
    "prolog": ({"slurm"}, "prolog"),
    "sbatch_option": ({"slurm"}, "sbatch_options"),
    "image": ({"kuberay"}, "image"),
    "namespace": ({"kuberay"}, "namespace"),
    "context": ({"kuberay"}, "context"),
    "head_cpus": ({"kuberay"}, "head_cpus"),
    "head_mem": ({"kuberay"}, "head_mem"),
    "volume": ({"kuberay"}, "volumes"),
    "service_account": ({"kuberay"}, "service_account"),
    "ttl": ({"kuberay"}, "ttl_s"),
    "ray_auth": ({"kuberay"}, "auth"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run an lvd command as a job on a Ray cluster, Slurm or Kubernetes (KubeRay)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="lvd submit --backend {ray,slurm,kuberay} [options] -- COMMAND [ARGS ...]")
    p.add_argument("--backend", required=True, choices=("ray", "slurm", "kuberay"), help="where the job runs")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, then print what would be submitted (Ray request, sbatch script, RayJob "
                        "manifest) and submit nothing")
    p.add_argument("--name", default=None,
                   help="job name (default lvd-COMMAND-DATE-TIME-XXXX; lowercase letters, digits and -)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. --env HF_HUB_OFFLINE=1 (repeatable)")
    p.add_argument("--follow", action="store_true",
                   help="after submitting, stream the job's output until it ends; exit 0 only if it succeeded")

    r = p.add_argument_group("ray backend")
    r.add_argument("--address", default=None,
                   help="the cluster's dashboard, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    r.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="a path or glob in the current directory not to upload (repeatable; what .gitignore "
                        "lists is not uploaded either)")
    r.add_argument("--entrypoint-num-cpus", type=float, default=None, metavar="N",
                   help="CPUs reserved for the lvd process itself (places it on a node that has them)")
    r.add_argument("--entrypoint-num-gpus", type=float, default=None, metavar="N",
                   help="GPUs reserved for the lvd process itself, e.g. 1 for sample or train")

    n = p.add_argument_group("slurm and kuberay backends")
    n.add_argument("--nodes", type=int, default=None,
                   help="Slurm nodes (default 1) / KubeRay worker pods (default 1)")
    n.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                   help="GPUs per node / per worker pod (default 0); torchrun starts one process per GPU")
    n.add_argument("--cpus-per-node", type=int, default=None, metavar="N",
                   help="CPUs per node (Slurm default: whole nodes for curate and train) / per worker pod (default 4)")
    n.add_argument("--mem", default=None, help="memory per node, e.g. 64G (Slurm) / per worker pod, e.g. 16Gi (KubeRay)")

    s = p.add_argument_group("slurm backend")
    s.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    s.add_argument("--partition", default=None, help="partition")
    s.add_argument("--account", default=None, help="account to charge")
    s.add_argument("--launcher", choices=("torchrun", "deepspeed"), default=None,
                   help="how train starts its processes on each node (default torchrun)")
    s.add_argument("--log-dir", default=None, metavar="DIR",
                   help="where the script and its output file go (default $LVD_HOME/jobs/NAME; must be on a "
                        "filesystem the first node can write)")
    s.add_argument("--prolog", default=None, metavar="FILE",
                   help="shell lines to run first on the node (module load ..., conda activate ...), copied verbatim")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH option, e.g. --sbatch-option=--qos=high (repeatable)")

    k = p.add_argument_group("kuberay backend")
    k.add_argument("--image", default=None, help="container image with lvd installed (required)")
    k.add_argument("--namespace", default=None, help="Kubernetes namespace (default: kubectl's current one)")
    k.add_argument("--context", default=None, help="kubectl context")
    k.add_argument("--head-cpus", type=int, default=None, metavar="N", help="CPUs of the head pod (default 2)")
    k.add_argument("--head-mem", default=None, help="memory of the head pod (default 8Gi)")
    k.add_argument("--volume", action="append", default=[], metavar="CLAIM:PATH",
                   help="mount a PersistentVolumeClaim in every pod (repeatable)")
    k.add_argument("--service-account", default=None, help="service account of the pods")
    k.add_argument("--ttl", type=int, default=None, metavar="SECONDS",
                   help="how long a finished RayJob is kept for status and logs (default 3600)")
    k.add_argument("--ray-auth", choices=("token", "none"), default=None,
                   help="Ray token authentication in the RayJob's cluster (default token; needs KubeRay >= 1.5.1)")

    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS ...]",
                   help="the lvd command to run, e.g. -- curate recipes/curation/default.yaml --set output=/data/x")
    p.set_defaults(run=run)


def backend_options(args: argparse.Namespace):
    """The chosen backend's typed options from the flags; a flag of another backend is an error, not ignored."""
    from common.config import ConfigError, validate
    from jobs.backends.kuberay import KubeRayOptions
    from jobs.backends.ray_jobs import RayJobsOptions
    from jobs.backends.slurm import SlurmOptions

    tree = {}
    for dest, (backends, field) in OPTIONS.items():
        value = getattr(args, dest)
        if value is None or value == []:
            continue
        if args.backend not in backends:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} applies to --backend {' / '.join(sorted(backends))}, not {args.backend}")
        tree[field] = value
    model = {"ray": RayJobsOptions, "slurm": SlurmOptions, "kuberay": KubeRayOptions}[args.backend]
    return validate(model, tree, source=f"--backend {args.backend} options")


def run(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from jobs.backends import JobError, backend_class
    from jobs.commands.jobs import follow_to_end
    from jobs.records import JobStore
    from jobs.submit import parse_env, prepare

    try:
        options = backend_options(args)
        spec = prepare(args.command, name=args.name, env=parse_env(args.env))
        backend = backend_class(args.backend)(options)
        if args.dry_run:
            text = backend.render(spec)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            return 0
        record = backend.submit(spec)
        JobStore().save(record)
    except (ConfigError, JobError) as e:
        print(f"lvd submit: {e}", file=sys.stderr)
        return 2
    print(f"submitted {record.name} to {record.backend} (job id {record.job_id})")
    if record.output:
        print(f"output:  {record.output}")
    print(f"follow:  lvd jobs logs {record.name} --follow")
    if not args.follow:
        return 0
    try:
        return follow_to_end(backend, record)
    except JobError as e:
        print(f"lvd submit: {e}", file=sys.stderr)
        return 2
