"""``kvmlab campaign SNAPSHOT INPUTS``: run every input from a snapshot on Dask
(:func:`kvmlab.distributed.run_inputs`) and write one row per input.

    kvmlab campaign parser.kvmsnap inputs.txt --scheduler tcp://10.0.0.5:8786 --out results.parquet

INPUTS is a directory (each regular file is one input, in name order) or a
text file with one input per line, hex or base64 (``--encoding``; ``auto``
takes hex when every line is hex). Without ``--scheduler`` a LocalCluster
with one worker process per CPU runs the campaign. A plug-in of the
``kvmlab`` command line (kvmlab/cli.py); Dask and pandas load only when the
command runs.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import re
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, KvmlabError
from .guests import INPUT_GPA

__all__ = ["read_inputs", "add_parser", "cmd_campaign", "ENCODINGS"]

ENCODINGS = ("auto", "hex", "base64")
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2})*\Z")


def _decode_line(line: bytes, encoding: str, number: int) -> bytes:
    try:
        if encoding == "hex":
            return bytes.fromhex(line.decode("ascii"))
        return base64.b64decode(line, validate=True)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"line {number} is not {encoding}: {e}", check="input_encoding") from None


def read_inputs(path: str | Path, encoding: str = "auto") -> list[bytes]:
    """The inputs in ``path``: a directory of files, or a file with one input
    per line (hex or base64; an empty line is an empty input)."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"encoding={encoding!r}: use one of {', '.join(ENCODINGS)}", check="argument_value")
    p = Path(path)
    try:
        if p.is_dir():
            return [f.read_bytes() for f in sorted(p.iterdir()) if f.is_file()]
        lines = [ln.strip() for ln in p.read_bytes().splitlines()]
    except OSError as e:
        raise ConfigError(f"cannot read inputs from {p}: {e.strerror or e}", check="input_read") from None
    if encoding == "auto":
        encoding = "hex" if all(_HEX.match(ln) for ln in lines) else "base64"
    return [_decode_line(ln, encoding, i + 1) for i, ln in enumerate(lines)]


def _summary(df: Any) -> str:
    counts = df["reason"].value_counts()
    parts = [f"{n} {r}" for r, n in counts.items() if n]
    crashes = df.loc[df["reason"] == "crash", "input_index"].tolist()
    text = f"{len(df)} inputs: " + ", ".join(parts)
    if crashes:
        more = f" (+{len(crashes) - 10} more)" if len(crashes) > 10 else ""
        text += "\ncrashing inputs: " + " ".join(map(str, crashes[:10])) + more
    return text


def cmd_campaign(args: argparse.Namespace) -> int:
    from . import distributed
    from .snapshot import Snapshot

    try:
        inputs = read_inputs(args.inputs, args.encoding)
        if args.out is not None and not str(args.out).endswith(".parquet"):
            raise ConfigError(f"--out {args.out}: write a .parquet file", check="output_format")
        with Snapshot.load(args.snapshot) as snap:
            kwargs = dict(input_gpa=args.input_gpa, batch_size=args.batch_size,
                          run_timeout_s=args.run_timeout_s, max_input_bytes=args.max_input_bytes)
            if args.scheduler:
                dask = distributed._dask()
                with dask.Client(args.scheduler) as client:
                    df = distributed.run_inputs(snap, inputs, client=client, **kwargs)
            else:
                df = distributed.run_inputs(snap, inputs, **kwargs)
        if args.out is not None:
            try:
                df.to_parquet(args.out, index=False)
            except ImportError:
                raise ConfigError('writing parquet needs pyarrow: pip install "kvmlab[dist]"', check="missing_extra") from None
    except (KvmlabError, OSError) as e:
        print(f"kvmlab campaign: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(_summary(df))
    if args.out is not None:
        print(f"wrote {len(df)} rows to {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    """Adds ``campaign`` to the ``kvmlab`` subcommands (the plug-in hook of kvmlab/cli.py)."""
    help = "run every input from a snapshot on Dask (a LocalCluster or --scheduler), one row per input"
    p = sub.add_parser("campaign", help=help, description=help + ". See kvmlab.distributed.")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="a snapshot file (Snapshot.save) of a guest waiting for input")
    p.add_argument("inputs", metavar="INPUTS", help="a directory of input files, or a file with one input per line")
    p.add_argument("--scheduler", metavar="ADDR", help="a Dask scheduler address (default: a LocalCluster)")
    p.add_argument("--out", metavar="FILE", help="write the rows to this .parquet file (needs pyarrow)")
    p.add_argument("--encoding", choices=ENCODINGS, default="auto", help="of an inputs file (default auto)")
    p.add_argument("--input-gpa", type=lambda s: int(s, 0), default=INPUT_GPA,
                   help=f"guest address of the input (default 0x{INPUT_GPA:x})")
    p.add_argument("--batch-size", type=int, default=1024, help="inputs per Dask task (default 1024)")
    p.add_argument("--run-timeout-s", type=float, default=1.0, help="a run longer than this is a timeout (default 1)")
    p.add_argument("--max-input-bytes", type=int, default=4096, help="longest input allowed (default 4096)")
    p.set_defaults(func=cmd_campaign)
