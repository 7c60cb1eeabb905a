"""Build a built-in decontamination set: the n-gram hashes of a benchmark's prompts.

    .venv/bin/python tools/decontam/build_ngrams.py rmbench ../shared/data/RM-Bench/*.json

writes services/ingest/data/<name>.ngrams (see Decontaminator.save), which ships in the wheel
and is then usable as `--decontaminate <name>` or `controller.decontaminate: [<name>]`.
The file holds 64-bit hashes of word n-grams only, never prompt text, so no benchmark data
is copied into the repository. Prompts are read and tokenised by services/ingest/preprocess
itself (benchmark_prompts, Decontaminator.add), so the set matches what ingest checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synpref.services.ingest.preprocess import BUILTIN_DIR, SET_SUFFIX, Decontaminator, benchmark_prompts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the set's name, e.g. rmbench (letters, digits, - and _)")
    parser.add_argument("prompts", nargs="+", help="benchmark prompt files (.txt, one per line, or pair files)")
    parser.add_argument("--ngram", type=int, default=13, help="n-gram size (default 13, as ingest)")
    parser.add_argument("--out-dir", type=Path, default=BUILTIN_DIR, help=f"where to write (default {BUILTIN_DIR})")
    args = parser.parse_args(argv)
    if not args.name.replace("-", "").replace("_", "").isalnum():
        parser.error(f"name {args.name!r}: letters, digits, - and _ only")
    # Each RM-Bench prompt comes with 9 style pairs: count every distinct prompt once.
    prompts = sorted({p for path in args.prompts for p in benchmark_prompts(path)})
    deco = Decontaminator(prompts, args.ngram)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}{SET_SUFFIX}"
    size = deco.save(out)
    print(
        f"{out}: {len(deco.grams)} gram digests of {deco.prompts} prompts "
        f"({len(prompts) - deco.prompts} without words skipped), short lengths {sorted(deco.short_lengths)}, "
        f"{size} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
