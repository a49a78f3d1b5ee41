"""The ``vectorgeo`` command line.

Subcommands live in :data:`COMMANDS`: name → (help, setup_parser, run). ``setup_parser(parser)`` adds
the subcommand's arguments; ``run(args) -> int`` does the work and returns the exit status. Add one
with :func:`register` (or an entry in :data:`COMMANDS`); import heavy modules inside ``run`` so that
``vectorgeo --help`` stays fast. Every :class:`~vectorgeo.errors.VectorgeoError` is shown as one line
on stderr with exit status 2.

Built in: ``vectorgeo db start|stop|status|url`` and ``vectorgeo query``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vectorgeo.errors import VectorgeoError

SetupFn = Callable[[argparse.ArgumentParser], None]
RunFn = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, SetupFn, RunFn]] = {}


def register(name: str, help: str, setup_parser: SetupFn, run: RunFn) -> None:
    """Add (or replace) a subcommand."""
    COMMANDS[name] = (help, setup_parser, run)


def load_cli_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The config named by ``--config`` (schema-validated, defaults filled; files not checked), or None.

    Without ``--config``, ``config/config.yaml`` of the project is used when it exists.

    Raises:
        ConfigError: unreadable or invalid file.
    """

    from vectorgeo.config import load_config
    from vectorgeo.db import project_dir

    path = getattr(args, "config", None)
    if path is None:
        default = project_dir() / "config" / "config.yaml"
        if not default.exists():
            return None
        path = default
    return load_config(path, check_files_too=False)


# --- vectorgeo db -----------------------------------------------------------------------------------------
def _setup_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status", "url"], help="what to do")
    p.add_argument(
        "--tcp", action="store_true", help="url: the TCP URL (127.0.0.1, with password) of the local cluster"
    )


def _run_db(args: argparse.Namespace) -> int:
    from vectorgeo import db, store

    cfg = load_cli_config(args)
    external = db.external_url(cfg)
    if args.action == "url":
        print(external or db.cluster(cfg).url(tcp=args.tcp))
        return 0
    if external is not None:
        shown = db.mask_password(external)
        if args.action in ("start", "stop"):
            print(f"external database configured ({shown}): nothing to {args.action}")
            return 0
        store.connect(external).close()
        print(f"external database {shown}: reachable")
        return 0
    cluster = db.cluster(cfg)
    if args.action == "start":
        was_running = cluster.status()
        url = cluster.start()
        print(f"{'already running' if was_running else 'started'}: {url}")
        return 0
    if args.action == "stop":
        print("stopped" if cluster.stop() else "not running")
        return 0
    if not cluster.status():
        state = "stopped" if cluster.initialized() else "not initialised"
        print(f"{state}: {cluster.datadir} (port {cluster.port})")
        return 3
    print(f"running: {cluster.url()}")
    with store.connect(cluster.url()) as conn:
        for d in store.datasets(conn):
            flag = "*" if d["active"] else " "
            print(
                f" {flag} model_version {d['model_version']!r}: {d['rows']} rows, {d['regions']} regions, "
                f"dim {d['dim']}, res {d['resolution']}, indexed {d['indexed_at'] is not None}"
            )
    return 0


# --- vectorgeo query --------------------------------------------------------------------------------------
def _setup_query(p: argparse.ArgumentParser) -> None:
    p.add_argument("--h3", help="query cell (15-digit hex)")
    p.add_argument("--lat", type=float, help="query point latitude (with --lng)")
    p.add_argument("--lng", type=float, help="query point longitude (with --lat)")
    p.add_argument(
        "--positive",
        action="append",
        metavar="CELL|LAT,LNG",
        help="search by example: a positive example, an H3 cell or 'lat,lng' (repeat for more)",
    )
    p.add_argument("--negative", action="append", metavar="CELL|LAT,LNG", help="a negative example (repeatable)")
    p.add_argument("--mode", choices=["similar", "classify"], default="similar", help="search by example: scoring")
    p.add_argument("--polygon", type=Path, help="search by example: only cells inside this GeoJSON (Multi)Polygon file")
    p.add_argument(
        "--out", type=Path, help="search by example: write the results to .parquet (GeoParquet), .csv or .geojson"
    )
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--radius-km", type=float, help="only cells within this distance of the query point")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST", "NORTH"), help="only cells inside")
    p.add_argument("--include-self", action="store_true", help="keep the query cell in the results")
    p.add_argument("--method", choices=["auto", "exact", "index"], default="auto", help="search method")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_examples(args: argparse.Namespace) -> int:
    """``vectorgeo query --positive ...``: search by example over every embedding, read into memory."""
    from vectorgeo import export, h3cells, search, store
    from vectorgeo.errors import RequestError
    from vectorgeo.store import vectors as store_vectors
    from vectorgeo.validation import check_radius, check_result_count, parse_bbox, parse_examples, parse_polygon

    if args.h3 is not None or args.lat is not None or args.lng is not None:
        raise RequestError("--positive", "give either examples (--positive/--negative) or --h3 / --lat --lng")
    fmt = export.format_of(args.out) if args.out is not None else "json"
    k = check_result_count(args.k, fmt, "-k")
    polygon = None
    if args.polygon is not None:
        try:
            polygon = parse_polygon(json.loads(args.polygon.read_text()), "--polygon")
        except (OSError, ValueError) as e:
            raise RequestError("--polygon", f"cannot read {args.polygon}: {e}") from None
    area = search.Area(
        radius_m=None if args.radius_km is None else check_radius(args.radius_km * 1000.0, "--radius-km"),
        bbox=None if args.bbox is None else parse_bbox(args.bbox, "--bbox"),
        polygon=polygon,
    )
    cfg = load_cli_config(args)
    with store.connect(config=cfg) as conn:
        vectors = store_vectors.load_vectors(conn)
        pos = parse_examples(args.positive, "--positive", vectors.resolution, required=True)
        neg = parse_examples(args.negative, "--negative", vectors.resolution, required=False)
        try:
            answer = search.run(
                vectors,
                search.Query(pos, neg, args.mode, k, area),
                missing=lambda cells: store_vectors.describe_missing(conn, vectors, cells),
            )
        except search.NoExamples as e:
            raise RequestError("--positive", str(e)) from None
    for ex in answer.examples:
        if ex.reason is not None:
            flag = "--positive" if ex.role == "positive" else "--negative"
            print(
                f"{flag} {ex.param.split('[')[1].rstrip(']')} ({h3cells.to_str(ex.cell)}) left out: {ex.reason}",
                file=sys.stderr,
            )
    if args.out is not None:
        export.write(args.out, answer.export(), fmt)
        print(f"{answer.rows.size} results ({answer.score_map.kind}) written to {args.out}")
        return 0
    results = answer.results()
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{'rank':>4}  {'h3':<15}  {'lat':>9}  {'lng':>10}  {answer.score_map.kind:>11}")
    for i, r in enumerate(results, 1):
        print(f"{i:>4}  {r['h3']}  {r['lat']:9.4f}  {r['lng']:10.4f}  {r['score']:11.4f}")
    return 0


def _run_query(args: argparse.Namespace) -> int:
    from vectorgeo import db, h3cells, store
    from vectorgeo.errors import RequestError

    if args.positive or args.negative or args.out is not None or args.polygon is not None:
        return _run_examples(args)
    if (args.h3 is None) == (args.lat is None and args.lng is None):
        raise RequestError("--h3", "give either --h3 or --lat/--lng")
    if args.h3 is None and (args.lat is None or args.lng is None):
        raise RequestError("--lat", "give both --lat and --lng")
    cfg = load_cli_config(args)
    settings = store.QuerySettings.from_config(db.settings(cfg))
    kw: dict[str, Any] = {
        "k": args.k,
        "radius_m": None if args.radius_km is None else args.radius_km * 1000.0,
        "bbox": args.bbox,
        "exclude_self": not args.include_self,
        "method": args.method,
    }
    with store.connect(config=cfg) as conn:
        if args.h3 is not None:
            rows = store.similar(conn, settings, h3=args.h3, **kw)
        else:
            rows = store.similar_to_point(conn, settings, args.lat, args.lng, **kw)
    if args.json:
        print(json.dumps([{**r, "h3": h3cells.to_str(r["h3"])} for r in rows]))
        return 0
    print(f"{'rank':>4}  {'h3':<15}  {'lat':>9}  {'lng':>10}  {'similarity':>10}")
    for i, r in enumerate(rows, 1):
        print(f"{i:>4}  {h3cells.to_str(r['h3'])}  {r['lat']:9.4f}  {r['lng']:10.4f}  {r['similarity']:10.4f}")
    return 0


# --- vectorgeo serve (vectorgeo.api) ------------------------------------------------------------------
def _setup_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: serve.port, 8000)")
    p.add_argument("--workers", type=int, help="worker processes (default: serve.workers, 2)")


def _run_serve(args: argparse.Namespace) -> int:
    from vectorgeo.api import serve

    return serve(load_cli_config(args), host=args.host, port=args.port, workers=args.workers)


register("db", "manage the project-local PostgreSQL cluster: start, stop, status, url", _setup_db, _run_db)
register(
    "query",
    "the k cells most similar to a cell or a point, or to examples (--positive, --negative, --out)",
    _setup_query,
    _run_query,
)
register("serve", "the similarity-search API and map viewer (FastAPI + uvicorn)", _setup_serve, _run_serve)


# --- vectorgeo run-summary -------------------------------------------------------------------------------
def _setup_summary(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="the workflow's results folder")


def _run_summary(args: argparse.Namespace) -> int:
    from vectorgeo.summary import run_summary

    for line in run_summary(args.results):
        print(line)
    return 0


register("run-summary", "what a finished workflow run produced, stage by stage", _setup_summary, _run_summary)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="vectorgeo", description="vectorgeo: an embedding for every land H3 cell")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, setup, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=None, help="config file (default: config/config.yaml)")
        setup(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vectorgeo`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except VectorgeoError as e:
        print(f"vectorgeo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
