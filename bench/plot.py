"""Bar chart of a results file written by `python -m cupy_ops bench --json FILE` (needs matplotlib).

    python bench/plot.py results.json [out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON written by `python -m cupy_ops bench --json`")
    parser.add_argument("output", nargs="?", help="PNG to write (default: the results path with .png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench/plot.py needs matplotlib: pip install matplotlib (or cupy-ops[plot])", file=sys.stderr)
        return 2
    from cupy_ops._bench import plot_results

    data = json.loads(Path(args.results).read_text())
    meta = data.get("meta", {})
    output = args.output or str(Path(args.results).with_suffix(".png"))
    sha = str(meta.get("git_sha"))[:10]
    title = f"{meta.get('gpu', '?')}, copy {meta.get('copy_bandwidth_GBps', 0):.0f} GB/s, git {sha}"
    plot_results(data["results"], output, title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
