"""``vmem graph``: its arguments and the command (the drawing is :mod:`vmem.analysis.graphs`)."""
from __future__ import annotations

from vmem.analysis.graphs import load_reports, render_documents
from vmem.errors import ConfigError

__all__ = ["add_graph_arguments", "cmd_graph"]


def add_graph_arguments(parser) -> None:
    """Arguments of ``vmem graph``."""
    parser.add_argument("reports", nargs="+", metavar="REPORT.json",
                        help="migration reports (vmem migrate --json), vmem compare --json documents, or predictions "
                             "(reports with \"predicted\": true, overlaid on the measured run's convergence plot)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="directory for the PNG files and report.html")
    parser.add_argument("--predicted", action="append", default=[], metavar="FILE",
                        help="a predicted run to overlay (dashed) on the convergence plots; repeatable")
    parser.add_argument("--title", help="title of the HTML report")


def cmd_graph(args) -> int:
    """``vmem graph``: render PNGs and one HTML report from saved JSON reports.

    Raises:
        vmem.errors.ConfigError: a file is missing, not JSON, or not a report.
    """
    try:
        docs = load_reports(list(args.reports))
        extra_pred = [d for _, d in load_reports(list(args.predicted))] if args.predicted else []
    except ValueError as err:
        raise ConfigError("REPORT.json", str(err)) from None
    written, page = render_documents(docs, args.out, extra_predicted=extra_pred, title=args.title)
    for p in written:
        print(p)
    print(page)
    return 0
