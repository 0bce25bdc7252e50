"""`lvd report`: a curation run -> one static HTML page (funnel, score histograms with thresholds,
contact sheet of kept and dropped clips, the recipe), self-contained so it can be mailed around."""

from __future__ import annotations

import argparse
import sys

# Same as curation.post.report's; not imported from there so that `lvd --help` stays fast (no pandas).
REPORT_NAME = "report.html"
DEFAULT_MAX_CLIPS = 60

EPILOG = """examples:
  lvd report runs/cur1                          # writes runs/cur1/report.html
  lvd report runs/cur1 --out /tmp/cur1.html --max-clips 200

Open the file in any browser (file:// works; no server, no network). Thumbnails are embedded, so the
page is one file. After `lvd curate --rethreshold`, run `lvd report` again to see the new decisions.
The run is read file by file and with DuckDB aggregates, never whole: the report of a cluster-scale
run needs no more memory than a small one's."""


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use e.g. --max-clips 60") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; use 0 (no contact sheet) or more")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a static HTML report of a curation run (funnel, scores, clips)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="output folder of `lvd curate` (holds ledger/, decisions/ and funnel.json)")
    p.add_argument("--out", default=None, metavar="FILE", help=f"HTML file to write (default RUN_DIR/{REPORT_NAME})")
    p.add_argument("--max-clips", type=_count, default=DEFAULT_MAX_CLIPS, metavar="N",
                   help=f"contact sheet size: at most N kept and N not-kept clips, spread over videos and drop "
                        f"reason codes (default {DEFAULT_MAX_CLIPS})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from curation.post.report import NoLedger, write_report

    try:
        path = write_report(args.run_dir, args.out, args.max_clips)
    except NoLedger as e:
        print(f"lvd report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
