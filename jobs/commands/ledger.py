"""`lvd ledger`: look into a curation run's datasets without loading them: counts by status and reason
code, or any SQL query over the views `videos`, `clips` and `decisions` (DuckDB reads only the columns
and row groups the query needs)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  lvd ledger runs/cur1                     # videos by status, clips kept and why the others were not
  lvd ledger runs/cur1 --query "SELECT clip_id, motion_score FROM clips ORDER BY motion_score DESC LIMIT 5"
  lvd ledger runs/cur1 --query "SELECT c.source, d.decision FROM clips c JOIN decisions d USING (clip_id)
                                WHERE d.reason_code = 'text_area_above_max'"
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="counts and SQL queries over a curation run's ledger (DuckDB)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="output folder of `lvd curate`")
    p.add_argument("--query", default=None, metavar="SQL",
                   help="a query over the views videos, clips and decisions; prints its rows")
    p.add_argument("--limit", type=int, default=50, help="rows printed at most (default %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import duckdb

    from curation.ledger import Ledger

    ledger = Ledger(args.run_dir)
    if not ledger.has_rows():
        print(f"lvd ledger: no ledger in {args.run_dir}; run `lvd curate RECIPE --set output={args.run_dir}` "
              "first", file=sys.stderr)
        return 2
    with duckdb.connect() as db:
        db.execute("SET memory_limit = '512MB'")
        _views(db, ledger)
        if args.query:
            try:
                result = db.execute(args.query)
            except duckdb.Error as e:
                print(f"lvd ledger: the query failed: {e}", file=sys.stderr)
                return 2
            names = [d[0] for d in result.description or []]
            print("\t".join(names))
            for row in result.fetchmany(args.limit):
                print("\t".join("" if v is None else str(v) for v in row))
            return 0
        for status, n in db.execute("SELECT status, count(*) FROM videos GROUP BY 1 ORDER BY 2 DESC").fetchall():
            print(f"videos {status}: {n}")
        print(f"clips: {db.execute('SELECT count(*) FROM clips').fetchone()[0]}")
        if ledger.decisions_dir.is_dir():
            for code, n in db.execute("SELECT CASE WHEN keep THEN 'kept' ELSE coalesce(reason_code, '?') END, "
                                      "count(*) FROM decisions GROUP BY 1 ORDER BY 2 DESC, 1").fetchall():
                print(f"clips {code}: {n}")
    return 0


def _views(db, ledger) -> None:
    def files(folder) -> list[str]:
        return sorted(str(p) for p in folder.glob("bucket=*/*.parquet"))

    for name, folder in (("videos", ledger.videos_dir), ("clips", ledger.clips_dir), ("decisions", ledger.decisions_dir)):
        paths = files(folder)
        if paths:
            db.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({paths!r}, union_by_name=true)")
