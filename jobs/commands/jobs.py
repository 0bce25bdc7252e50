"""`lvd jobs`: the jobs `lvd submit` sent, on every backend: list them, ask their status, read or follow their
output, cancel them. Records live under $LVD_HOME/jobs (default ~/.lvd/jobs); a job is named by its lvd
name, its backend id (Ray submission id, Slurm job id, RayJob name) or a unique prefix of either."""

from __future__ import annotations

import argparse
import sys
import time

EPILOG = """examples:
  lvd jobs list
  lvd jobs status lvd-curate-20260101-120000-ab12 --wait
  lvd jobs logs 48213 --follow          (a Slurm job id)
  lvd jobs cancel lvd-train"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list submitted jobs; status, logs and cancel on any backend",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    ls = which.add_parser("list", help="the jobs submitted from this machine, newest first",
                          description="Lists the recorded jobs, newest first: name, backend, backend id, submit "
                                      "time, the state last seen, the command and where it writes.")
    ls.add_argument("--backend", choices=("ray", "slurm", "kuberay"), default=None, help="only this backend's jobs")
    ls.add_argument("--refresh", action="store_true",
                    help="ask each backend for the current state (otherwise the state last seen is shown)")
    ls.add_argument("-n", "--limit", type=int, default=20, help="show at most this many (default 20; 0 = all)")
    ls.set_defaults(run=run_list)

    st = which.add_parser("status", help="a job's state: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED",
                          description="Asks the job's backend for its state and prints it with the record "
                                      "(command, recipe, output). UNKNOWN means the backend no longer knows the "
                                      "job (e.g. Slurm without accounting, some minutes after it ended). Exit "
                                      "status 0, or 2 when the job or its cluster cannot be found; with --wait, "
                                      "waits until the job ends and exits 0 only if it SUCCEEDED, else 1.")
    st.add_argument("job", help="lvd name, backend id, or a unique prefix")
    st.add_argument("--wait", action="store_true", help="wait until the job ends; exit 0 only on success")
    st.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="with --wait, give up after this long (exit 1)")
    st.set_defaults(run=run_status)

    lg = which.add_parser("logs", help="a job's output so far (--follow: until it ends)",
                          description="Prints the job's output: the driver log of a Ray job, the Slurm output "
                                      "file, the RayJob submitter's log. With --follow it keeps printing until "
                                      "the job ends.")
    lg.add_argument("job", help="lvd name, backend id, or a unique prefix")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(run=run_logs)

    cn = which.add_parser("cancel", help="stop a job",
                          description="Stops the job: Ray stop_job, scancel, or deleting the RayJob (which "
                                      "takes its Ray cluster and recipe ConfigMap with it).")
    cn.add_argument("job", help="lvd name, backend id, or a unique prefix")
    cn.set_defaults(run=run_cancel)


def _fail(e: Exception) -> int:
    print(f"lvd jobs: {e}", file=sys.stderr)
    return 2


def _open(ref: str):
    from jobs.backends import backend_class
    from jobs.records import JobStore

    store = JobStore()
    record = store.find(ref)
    return store, record, backend_class(record.backend)()


def wait_until_done(backend, record, timeout_s: float | None = None, poll_s: float = 2.0):
    """Polls until the job ends (or timeout_s passes); returns the last JobStatus."""
    from jobs.backends import JobState

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = backend.status(record)
        if status.state.terminal or status.state is JobState.UNKNOWN:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def follow_to_end(backend, record) -> int:
    """Streams the output until the job ends, prints the final state; 0 only if it succeeded."""
    from jobs.backends import JobState
    from jobs.records import JobStore

    backend.logs(record, sys.stdout, follow=True)
    status = wait_until_done(backend, record)
    record.last_state = status.state.value
    JobStore().save(record)
    print(f"{record.name}: {status.line()}")
    return 0 if status.state is JobState.SUCCEEDED else 1


def run_list(args: argparse.Namespace) -> int:
    from jobs.backends import JobError, backend_class
    from jobs.records import JobStore

    store = JobStore()
    records = [r for r in store.all() if args.backend in (None, r.backend)]
    if args.limit:
        records = records[: args.limit]
    if not records:
        print(f"no jobs recorded in {store.root}")
        return 0
    rows = []
    for r in records:
        state = r.last_state or "-"
        if args.refresh:
            try:
                state = backend_class(r.backend)().status(r).state.value
                r.last_state = state
                store.save(r)
            except Exception as e:  # one unreachable cluster must not hide the other jobs
                state = f"? ({e.__class__.__name__})" if not isinstance(e, JobError) else "? (unreachable)"
        command = r.command_line()
        rows.append((r.name, r.backend, r.job_id, r.submitted_at.replace("+00:00", "Z"), state,
                     command if len(command) <= 60 else command[:57] + "...", r.output or "-"))
    header = ("NAME", "BACKEND", "JOB ID", "SUBMITTED (UTC)", "STATE", "COMMAND", "OUTPUT")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def run_status(args: argparse.Namespace) -> int:
    from jobs.backends import JobError, JobState
    from jobs.records import JobNotFound

    try:
        store, record, backend = _open(args.job)
        status = wait_until_done(backend, record, args.timeout) if args.wait else backend.status(record)
    except (JobNotFound, JobError) as e:
        return _fail(e)
    record.last_state = status.state.value
    store.save(record)
    print(f"{record.name}: {status.line()}")
    print(f"  backend {record.backend}, job id {record.job_id}, submitted {record.submitted_at}")
    print(f"  command {record.command_line()}")
    if record.recipe:
        print(f"  recipe  {record.recipe}")
    if record.output:
        print(f"  output  {record.output}")
    for key, value in record.info.items():
        if key in ("address", "log", "script", "namespace", "context"):
            print(f"  {key:<7} {value}")
    if args.wait:
        return 0 if status.state is JobState.SUCCEEDED else 1
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from jobs.backends import JobError
    from jobs.records import JobNotFound

    try:
        _, record, backend = _open(args.job)
        backend.logs(record, sys.stdout, follow=args.follow)
    except (JobNotFound, JobError) as e:
        return _fail(e)
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    from jobs.backends import JobError
    from jobs.records import JobNotFound, utc_now

    try:
        store, record, backend = _open(args.job)
        backend.cancel(record)
    except (JobNotFound, JobError) as e:
        return _fail(e)
    record.cancelled_at = utc_now()
    store.save(record)
    print(f"cancel requested for {record.name} ({record.backend} job {record.job_id}); "
          f"`lvd jobs status {record.name}` shows when it has stopped")
    return 0
