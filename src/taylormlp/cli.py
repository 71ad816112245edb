"""The `taylormlp` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import TaylorMLPError
from .options import PRESETS
from .progress import quiet
from .release import DTYPES
from .runtime import BASES
from .sources import BUILTIN_MODELS

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _slowdown(text: str) -> float:
    value = float(text)
    if not 1.25 <= value <= 16.0:
        raise argparse.ArgumentTypeError(f"must be between 1.25 and 16, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taylormlp",
        description="Release language models as TaylorMLP series coefficients: token-exact, throttled, audited.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    builtins = ", ".join(BUILTIN_MODELS)

    p = sub.add_parser("protect", help="convert a model's MLPs into series coefficients and write a release",
                       description="Calibrate, convert every MLP to TaylorMLP form and write a release directory.")
    p.add_argument("source", help=f"model: a Hugging Face model directory, a .gguf file, or a built-in name ({builtins})")
    p.add_argument("--out", required=True, type=Path, help="release directory to create")
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="'paper': Taylor basis, midpoint expansion, narrowest channels first (Wang et al. 2024); "
                        "'default': piecewise Chebyshev series (value and slope of the activation at every piece "
                        "edge), intervals widened by half their width, channels ranked by output error (full "
                        "coverage on SmolLM2). Default: default")
    p.add_argument("--order", type=_positive_int, help="series order N (default 8); more orders = slower release")
    p.add_argument("--slowdown", type=_slowdown,
                   help="target decode slowdown against the original on this machine (1.25 to 16): chooses coverage, "
                        "order N and pieces jointly (a FLOPs model narrows the choice, interleaved decode timing "
                        "confirms it) and records requested, measured and FLOPs ratios and the machine")
    p.add_argument("--basis", choices=list(BASES), help="override the preset's basis")
    p.add_argument("--coverage", type=_unit_float,
                   help="share of MLP channels to protect (0..1); default: the largest that stays token-exact "
                        "on the validation prompts")
    p.add_argument("--error-budget", type=float,
                   help="automatic coverage accepts only validation runs that are token-exact with every logit within "
                        "this absolute error of the original (default 0.1); smaller = safer on unseen prompts")
    p.add_argument("--max-pieces", type=_positive_int,
                   help="split each channel's interval into at most this many series pieces where one degree-N "
                        "series is not accurate enough (default preset 8, paper preset 1); every piece is real "
                        "series work at run time")
    p.add_argument("--calibration", type=Path,
                   help="UTF-8 text file used as calibration prose instead of the built-in corpus "
                        "(paragraphs separated by blank lines)")
    p.add_argument("--calibration-samples", type=_positive_int, metavar="N",
                   help="bound the calibration work: use at most N prose chunks (of 256 tokens) and N calibration "
                        "prompts (every fifth held out for validation), evenly spread over the corpus; default: "
                        "the whole built-in corpus (about 230 prose chunks, 112 prompts)")
    p.add_argument("--batch-size", type=_positive_int, default=128,
                   help="prompts generated together while calibrating (default 128); each decode step reads every "
                        "layer once per batch, so larger is faster for big models and costs more activation memory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where calibration, validation and the coverage search run (default auto: cuda when a GPU "
                        "is visible); series coefficients are always computed in float64 on the CPU")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the release (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed for the ±1 sign obfuscation (default 0)")
    p.add_argument("--no-chat", action="store_true", help="do not calibrate through the chat template")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")

    g = sub.add_parser("generate", help="generate text with a release (greedy)",
                       description="Greedy generation with a release directory (or, for comparison, a base model).")
    g.add_argument("release", help="release directory (or a base model SOURCE with --base)")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--base", action="store_true", help="treat RELEASE as an unprotected base model source")

    i = sub.add_parser("inspect", help="describe a release (coverage, order, sizes)",
                       description="Verify a release against its manifest and describe it.")
    i.add_argument("release", type=Path, help="release directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--leak-check", metavar="SOURCE",
                   help="scan every stored tensor for protected down-projection columns or biases of SOURCE")

    c = sub.add_parser("compare", help="greedy generations of the original and a release on a prompt file",
                       description="Generate with the original and the release on every prompt and count identical "
                                   "generations (the token-exactness check).")
    c.add_argument("source", help="the original model SOURCE")
    c.add_argument("release", type=Path, help="release directory")
    c.add_argument("--prompts", type=Path, required=True,
                   help='JSON file: {"prompts": [{"kind": "chat"|"raw", "text": ...}, ...]}')
    c.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens per prompt (default 64)")
    c.add_argument("--json", type=Path, help="write the full comparison as JSON here")

    d = sub.add_parser("demo", help="protect SmolLM2 and show original vs protected generations side by side")
    d.add_argument("--out", type=Path, default=Path("releases/smollm2-paper"), help="release directory to use/create")
    d.add_argument("--preset", choices=list(PRESETS), default="paper", help="preset (default paper)")
    d.add_argument("--max-new-tokens", type=_positive_int, default=48, help="tokens per prompt (default 48)")
    d.add_argument("--force", action="store_true", help="re-protect even if --out exists")

    b = sub.add_parser("bench", help="latency, memory and size of the original and releases",
                       description="Prefill and decode latency, peak memory and size, interleaved runs.")
    b.add_argument("source", help="the original model SOURCE")
    b.add_argument("releases", nargs="+", type=Path, help="release directories")
    b.add_argument("--tokens", type=_positive_int, default=32, help="decode tokens per run (default 32)")
    b.add_argument("--repeats", type=_positive_int, default=3, help="interleaved repeats (default 3)")
    b.add_argument("--json", type=Path, help="write results as JSON here")
    b.add_argument("--plot", type=Path, help="write a PNG plot here")

    a = sub.add_parser("audit", help="attack a release the known ways and report what an attacker recovers")
    a.add_argument("release", type=Path, help="release directory")
    a.add_argument("--original", help="original model SOURCE, used only to score the attacks")
    a.add_argument("--json", type=Path, help="write the report as JSON here")
    a.add_argument("--attacks", default="coefficient_ratio,regression,factorization,finetune,distill",
                   help="comma-separated subset of attacks to run")
    return parser


def _one_line(text: str) -> str:
    """An error message on one line: multi-line messages (from transformers, say) are joined."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _unexpected_io_error(exc: BaseException) -> str:
    """The safety net's message for an OSError / UnicodeDecodeError / JSON error that escaped a specific check."""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "a file"
        also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return (f"cannot use {where}{also}: {exc.strerror or exc}; check that the path exists, is the kind of file "
                f"expected, is readable (inputs) or writable (outputs), and that the disk has room")
    if isinstance(exc, UnicodeDecodeError):
        return (f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}); check the files you gave "
                f"(a binary or damaged file where text or JSON is expected)")
    return f"an input file is not valid JSON ({exc}); check the files you gave (truncated or damaged?)"


def _quiet_libraries() -> None:
    """With TAYLORMLP_QUIET=1, transformers' own progress bars and warnings stay off stderr as well."""
    if not quiet():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        from . import commands  # after parsing: --help and usage errors need none of the models' libraries

        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except TaylorMLPError as exc:
        print(f"taylormlp {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"taylormlp {args.command}: error: {_one_line(_unexpected_io_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
