"""The `taylormlp` command line: the parser.

Before parsing, this module imports only the torch-free tables (choices.py) and errors.py, so that `--help`,
`--version` and every usage error answer at once; the commands (commands.py, which load torch and transformers)
are imported after parsing.  A usage error is one line on stderr naming the flag as typed, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import textwrap
import threading
from pathlib import Path

from ..common import __version__
from ..common.choices import (ATTACKS, BASES, BUILTIN_MODELS, DEFAULT_ATTACKS, DTYPE_NAMES, ENGINES, MAX_ORDER,
                              MAX_PIECES, MAX_ROUNDS, PRESETS, REPEATS, ROUNDS, SLOWDOWN_RANGE, WORKLOAD_NEW_TOKENS,
                              engine_names, parse_workload)
from ..common.errors import TaylorMLPError

# the two words every command uses, defined once and shown under each command's flags
TERMS = (f"SOURCE   an original (unprotected) model: a Hugging Face model directory, a .gguf file, or a built-in "
         f"name ({', '.join(BUILTIN_MODELS)})\n"
         f"RELEASE  a release directory written by `taylormlp protect` (config.json with a \"taylormlp\" section, "
         f"series coefficients, tokenizer, taylormlp_manifest.json)")


class Number:
    """An argparse type: a finite int or float within limits.  A bad value says the limits, and the parser's
    error() puts the flag in front as typed: "--max-pieces must be between 1 and 64, got 100"."""

    def __init__(self, kind: type, low: float, high: float | None = None, low_open: bool = False):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        self.__name__ = "whole number" if kind is int else "number"  # argparse names the type by this

    @property
    def limits(self) -> str:
        if self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        return f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {self.__name__} ({self.limits}), got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number ({self.limits}), got {text!r}")
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"must be {self.limits}, got {text}")
        return value


POSITIVE = Number(int, 1)
ORDER = Number(int, 1, MAX_ORDER)
PIECES = Number(int, 1, MAX_PIECES)
SHARE = Number(float, 0.0, 1.0)
SLOWDOWN = Number(float, *SLOWDOWN_RANGE)
BUDGET = Number(float, 0.0, low_open=True)
SEED = Number(int, 0)
BATCH = Number(int, 1, 1024)
ROUND_COUNT = Number(int, 1, MAX_ROUNDS)
PORT = Number(int, 1, 65535)
KV_TOKENS = Number(int, 256)
BATCH_TOKENS = Number(int, 16)
CLIENTS = Number(int, 1, 256)
GENERATED = Number(int, 2)  # a workload's generated tokens: the prefill's, then at least one decode step


def _workload(text: str) -> str:
    """--workload's type: 'P:G' checked (common/choices.parse_workload), kept as given."""
    try:
        parse_workload(text)
    except TaylorMLPError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _one_line(text: str) -> str:
    """An error message on one line: multi-line messages (from transformers, say) are joined."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own, so that definitions and tables keep their lines; a
    line that starts with a term and two spaces ("SOURCE   an original ...") hangs below its text."""

    def _fill_text(self, text, width, indent):
        def fill(line: str) -> str:
            term = re.match(r"\s*\S+\s{2,}", line)
            hang = indent + " " * (term.end() if term else 0)
            return textwrap.fill(line, width, initial_indent=indent, subsequent_indent=hang) if line.strip() else ""
        return "\n".join(fill(line) for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    commands: dict = {}  # the command parsers, by name (set on the top-level parser)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the command does not know is reported by that command's parser."""
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            self.commands.get(getattr(args, "command", None), self).error(f"unrecognized arguments: "
                                                                         f"{' '.join(extras)}")
        return args

    def error(self, message):
        """One line, the flag as typed in front: `taylormlp protect: error: --max-pieces must be between 1 and 64,
        got 100 (see `taylormlp protect --help`)`; exit status 2."""
        message = re.sub(r"^argument ([^:]+): (?=must )", lambda m: m.group(1).split("/")[-1] + " ", message)
        message = re.sub(r"^argument ", "", message)
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _preset_values(key: str) -> str:
    return ", ".join(f"{name} preset {values[key]}" for name, values in PRESETS.items())


def _add_protect(sub) -> None:
    p = _command(sub, "protect", "convert a model's MLPs into series coefficients and write a release",
                 "Calibrate an original model, convert its MLP channels to TaylorMLP series coefficients and write a "
                 "RELEASE directory (nothing is written until it is complete).")
    p.add_argument("source", metavar="SOURCE", help="the original model (see below)")
    p.add_argument("--out", required=True, type=Path,
                   help="RELEASE directory to create; it must not exist (--force replaces an earlier release)")
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="'paper': Taylor basis, midpoint expansion, narrowest channels first (Wang et al. 2024); "
                        "'default': piecewise Chebyshev series (value and slope of the activation at every piece "
                        "edge), intervals widened by half their width, channels ranked by output error (full "
                        "coverage on SmolLM2). Default: default")
    p.add_argument("--order", type=ORDER,
                   help=f"series order N, {ORDER.limits} (default: {_preset_values('order')}); more orders = slower "
                        f"release")
    p.add_argument("--slowdown", type=SLOWDOWN,
                   help=f"target decode slowdown against the original on this machine, {SLOWDOWN.limits}: chooses "
                        "coverage, order N and pieces jointly (a FLOPs model narrows the choice, interleaved decode "
                        "timing confirms it) and records requested, measured and FLOPs ratios and the machine; "
                        "default: none (the preset's order, the largest token-exact coverage)")
    p.add_argument("--serving-batch", type=BATCH, metavar="B",
                   help=f"with --slowdown: meet it as the decode throughput ratio at batch B (B concurrent sequences "
                        f"decoded together, as a server batches requests), B {BATCH.limits}; the slowdown grows with "
                        "the batch on a CPU, and the release records it at batch 1, 8, 32 and B either way. Default 1 "
                        "(one sequence)")
    p.add_argument("--workload", type=_workload, metavar="P:G",
                   help="with --slowdown: meet it as the whole-request throughput ratio on the requests users send: "
                        "at --serving-batch B, B distinct prompts of real text of P tokens each, each generating G "
                        "tokens (e.g. 512:128; P at least 1, G at least 2), prefill and decode timed together; the "
                        "card records the workload and the prefill, decode and request slowdowns at batch 1 and B. "
                        "Default: none (decode throughput on a short prompt)")
    p.add_argument("--rounds", type=ROUND_COUNT,
                   help=f"with --slowdown: at most R rounds, R {ROUND_COUNT.limits}; a round measures one setting (and "
                        "confirms a read near the target); after each miss the line from FLOPs ratio to measured "
                        "slowdown is refitted and the next setting chosen from it (the same one: read again). "
                        f"Default {ROUNDS} (on a noisy machine or on vLLM, whose slowdown the FLOPs model predicts less "
                        "well, 5 reaches the target more often)")
    _engine(p, "protect", "with --slowdown: where the slowdown is measured and dialed", "On an engine that runs "
            "releases elsewhere, each candidate is written as a temporary release and run there, interleaved rounds "
            "against the original. The card names the engine", "--engine-dtype",
            "with --engine vllm: the dtype vLLM runs the original and the candidates in (default auto: vLLM's "
            "choice, bfloat16 on a CPU); the release itself is written in --dtype")
    p.add_argument("--basis", choices=list(BASES),
                   help=f"override the preset's series basis (default: {_preset_values('basis')})")
    p.add_argument("--coverage", type=SHARE,
                   help=f"share of MLP channels to protect, {SHARE.limits}; default: the largest that stays "
                        "token-exact on the validation prompts")
    p.add_argument("--error-budget", type=BUDGET,
                   help="automatic coverage accepts only validation runs that are token-exact with every logit within "
                        f"this absolute error of the original, a number {BUDGET.limits} (default: "
                        f"{_preset_values('error_budget')}); smaller = safer on unseen prompts")
    p.add_argument("--max-pieces", type=PIECES,
                   help="split each channel's interval into at most this many series pieces where one degree-N "
                        f"series is not accurate enough, {PIECES.limits} (default: {_preset_values('max_pieces')}); "
                        "every piece is real series work at run time")
    p.add_argument("--calibration", type=Path,
                   help="UTF-8 text file used as calibration prose instead of the built-in corpus "
                        "(paragraphs separated by blank lines); default: the built-in corpus")
    p.add_argument("--calibration-samples", type=POSITIVE, metavar="N",
                   help=f"bound the calibration work, N {POSITIVE.limits}: use at most N prose chunks (of 256 tokens) "
                        "and N calibration prompts (every fifth held out for validation), evenly spread over the "
                        "corpus; default: the whole built-in corpus (about 230 prose chunks, 112 prompts)")
    p.add_argument("--batch-size", type=POSITIVE, default=128,
                   help=f"prompts generated together while calibrating, {POSITIVE.limits} (default 128); each decode "
                        "step reads every layer once per batch, so larger is faster for big models and costs more "
                        "activation memory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where calibration, validation and the coverage search run (default auto: cuda when a GPU "
                        "is visible); series coefficients are always computed in float64 on the CPU")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="float32",
                   help="dtype of the release (default float32)")
    p.add_argument("--seed", type=SEED, default=0,
                   help=f"seed for the ±1 sign obfuscation, a whole number {SEED.limits} (default 0)")
    p.add_argument("--no-chat", action="store_true",
                   help="do not calibrate through the chat template (default: through it when the model has one)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it holds an earlier release (any other existing directory is refused)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the pre-flight (release size, peak memory, rough time, from config.json and the "
                        "safetensors headers: no weight is read) and stop; exit status 0 if the run would start, 2 "
                        "if it would be refused (release bigger than the free disk or peak above the available "
                        "memory). Default: the pre-flight is logged and checked at the start of every protect")


def _add_run_commands(sub) -> None:
    g = _command(sub, "generate", "generate text with a release (greedy)",
                 "Greedy generation with a RELEASE (or, with --base, with an original model SOURCE, to compare).")
    g.add_argument("release", metavar="RELEASE", help="the release directory (with --base: an original model SOURCE "
                                                      "instead)")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (default: the prompt as plain text)")
    _max_new_tokens(g, "tokens to generate", 64)
    g.add_argument("--base", action="store_true",
                   help="run an original model SOURCE instead of a release (unprotected; default: RELEASE)")

    i = _command(sub, "inspect", "describe a release (coverage, order, sizes, validation)",
                 "Verify a RELEASE against its manifest (every file's size and sha256) and describe it: what is "
                 "protected, its size, and how closely it matched the original when it was made.")
    i.add_argument("release", metavar="RELEASE", type=Path, help="the release directory (see below)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    i.add_argument("--leak-check", metavar="SOURCE",
                   help="scan every stored tensor for protected down-projection columns or biases of the original "
                        "model SOURCE (default: no scan); exit status 1 if any is found")

    c = _command(sub, "compare", "greedy generations of the original and a release on a prompt file",
                 "Generate with the original and the release on every prompt and count identical generations (the "
                 "token-exactness check).")
    c.add_argument("source", metavar="SOURCE", help="the original model (see below)")
    c.add_argument("release", metavar="RELEASE", type=Path, help="the release directory made from it")
    c.add_argument("--prompts", type=Path, required=True,
                   help='JSON file: {"prompts": [{"kind": "chat"|"raw", "text": ...}, ...]}')
    _max_new_tokens(c, "tokens per prompt", 64)
    _engine(c, "compare", "where both models generate", "On an engine that runs the models elsewhere both are "
            "started side by side and every prompt is generated in one batch, exactly --max-new-tokens tokens, "
            "each cut after its first EOS", "--dtype", "--engine vllm: the dtype vLLM runs both models in ('auto', "
            "vLLM's default: bfloat16 on a CPU); float32 is token-exact with load_release. Default: auto")
    c.add_argument("--json", type=Path, help="write the full comparison as JSON to this new file (default: none)")
    c.add_argument("--force", action="store_true", help="replace the --json file if it exists")

    d = _command(sub, "demo", "protect SmolLM2 and show original vs protected generations side by side",
                 "Protect the built-in smollm2-135m-instruct into --out (once: a valid release already there is "
                 "reused), then print the original's and the release's greedy generations of four prompts side by "
                 "side, with the tokens matched and the latency ratio.")
    d.add_argument("--out", type=Path, default=Path("releases/smollm2-paper"),
                   help="RELEASE directory to reuse or create (default releases/smollm2-paper)")
    d.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="preset when protecting (default paper; see `taylormlp protect --help`)")
    d.add_argument("--force", action="store_true",
                   help="re-protect even if --out holds a valid release (any other existing directory is refused)")
    _max_new_tokens(d, "tokens per prompt", 48)

    b = _command(sub, "bench", "latency, memory and size of the original and releases",
                 "Prefill and decode latency (interleaved runs), peak memory (one fresh process per model) and size "
                 "of the original and each release.")
    b.add_argument("source", metavar="SOURCE", help="the original model (see below)")
    b.add_argument("releases", nargs="+", type=Path, metavar="RELEASE", help="release directories made from it")
    b.add_argument("--tokens", type=POSITIVE, default=32, help=f"decode tokens per run, {POSITIVE.limits} (default 32)")
    b.add_argument("--repeats", type=POSITIVE, default=REPEATS,
                   help=f"interleaved repeats, {POSITIVE.limits} (default {REPEATS})")
    b.add_argument("--batch-sizes", type=BATCH, nargs="+", metavar="B",
                   help=f"also measure decode throughput at these batch sizes, each {BATCH.limits} (B copies of the "
                        "prompt decoded together; every batch size and model interleaved in one run; batch 1 is always "
                        "among them): tokens/s over the batch, slowdown, TTFT and inter-token latency per batch size, "
                        "and --plot draws slowdown against batch size. Default: none (batch 1 only)")
    b.add_argument("--prompt-tokens", type=POSITIVE, metavar="P",
                   help=f"time a workload instead of bench's fixed prompt: B distinct prompts of real text, P tokens "
                        f"each ({POSITIVE.limits}), at every --batch-sizes B, each generating --new-tokens tokens; "
                        f"per batch size and model the prefill (time to first token), decode and whole-request "
                        f"slowdowns and the FLOPs ratios, a table and with --plot a plot. Default: none (the latency, "
                        f"memory and size table on the fixed prompt)")
    b.add_argument("--new-tokens", type=GENERATED, metavar="G",
                   help=f"with --prompt-tokens: tokens each request generates, the first from the prefill "
                        f"({GENERATED.limits}; default {WORKLOAD_NEW_TOKENS})")
    b.add_argument("--serve-concurrency", type=CLIENTS, nargs="+", metavar="C",
                   help=f"also measure throughput through the server (`taylormlp serve`'s engine: transformers' serve "
                        f"app and continuous batching, the original served the same way, one process per model) with "
                        f"C concurrent streaming clients, each C {CLIENTS.limits}; every concurrency and model "
                        f"interleaved in one run, one server busy at a time: requests/s, output tokens/s over all "
                        f"clients, slowdown, TTFT and inter-token latency. Needs the serve extra. Default: none")
    b.add_argument("--serve-requests", type=POSITIVE, metavar="K",
                   help=f"with --serve-concurrency: requests each client sends per run, back to back, "
                        f"{POSITIVE.limits} (default 1)")
    b.add_argument("--serve-tokens", type=POSITIVE, metavar="T",
                   help=f"with --serve-concurrency: max_tokens of every request, greedy, EOS ignored so that each "
                        f"decodes exactly T tokens, {POSITIVE.limits} (default 16)")
    _engine(b, "bench", "where every model is timed", "On vLLM a native release is timed once more on vLLM's "
            "Transformers backend, as a row of its own, to tell the series' cost from the backend's; the work "
            "model's FLOPs and bytes ratios beside", "--dtype", "with an engine other than taylormlp: the dtype it "
            "runs every model in (default auto: the engine's choice, vLLM's bfloat16 on a CPU)")
    b.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where the models are timed (default cpu; auto: cuda when a GPU is visible); on cuda the "
                        "time-per-term microbenchmark and the peak-RSS probes, which measure the CPU, are left out")
    b.add_argument("--json", type=Path, help="write results as JSON to this new file (default: none)")
    b.add_argument("--plot", type=Path, help="write a plot to this new image file, e.g. bench.png: slowdown against "
                                             "series order, or with --batch-sizes against batch size (default: none)")
    b.add_argument("--force", action="store_true", help="replace the --json and --plot files if they exist")


def _add_audit(sub) -> None:
    width = max(len(name) for name in ATTACKS)
    table = "\n".join(f"  {name:{width}}  {info.description} [{info.cost}]" for name, info in ATTACKS.items())
    a = _command(sub, "audit", "attack a release the known ways and report what an attacker recovers",
                 "Run the known attacks on a RELEASE, each using only what a release user has, and report per "
                 "attack the protected weights it recovers (relative error, scored with --original), the tokens "
                 "its rebuilt model matches and its time.",
                 epilog=f"attacks (in their canonical order, with their typical cost on a small model):\n{table}")
    a.add_argument("release", metavar="RELEASE", type=Path, help="the release directory (see below)")
    a.add_argument("--original", metavar="SOURCE",
                   help="the original model SOURCE, used only to score the attacks (default: none; tokens are then "
                        "matched against the release itself)")
    a.add_argument("--json", type=Path, help="write the report as JSON to this new file (default: none)")
    a.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    a.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help=f"comma-separated attacks to run, from the list below (default: all {len(DEFAULT_ATTACKS)}: "
                        f"{', '.join(DEFAULT_ATTACKS)})")
    a.add_argument("--stream", action="store_true", default=None,
                   help="read the release one layer at a time instead of loading it whole (closed-form attacks only: "
                        "--attacks coefficient_ratio,factorization; tokens are then not matched); default: streamed "
                        "when the release is more than half the available memory and every chosen attack can be")


def _max_new_tokens(parser, what: str, default: int) -> None:
    parser.add_argument("--max-new-tokens", type=POSITIVE, default=default,
                        help=f"{what}, {POSITIVE.limits} (default {default})")


def _engine(parser, command: str, what: str, more: str, dtype_flag: str, dtype_help: str) -> None:
    """--engine for `command` (the engines common/choices.ENGINES lists for it, each with its summary) and the flag
    of the dtype an engine runs the models in."""
    names = engine_names(command)
    listed = "; ".join(f"'{name}'{' (default)' if name == names[0] else ''}: {ENGINES[name].summary}" for name in names)
    parser.add_argument("--engine", choices=names, default=names[0], help=f"{what}. {listed}. {more}")
    parser.add_argument(dtype_flag, choices=["auto", *DTYPE_NAMES], default="auto", help=dtype_help)


def _add_serve(sub) -> None:
    s = _command(sub, "serve", "serve a release through an OpenAI-compatible HTTP API (transformers or vLLM)",
                 "Verify a RELEASE and serve it with transformers' own serving engine: an OpenAI-compatible HTTP API "
                 "(GET /v1/models; POST /v1/chat/completions, /v1/completions and /v1/responses, streaming or not) "
                 "with continuous batching of concurrent requests. The model is named after the release directory "
                 "(its last path component). Ctrl-C or SIGTERM stops it. Needs the serve extra: pip install "
                 "'taylormlp[serve]'. See docs/serving.md.")
    s.add_argument("release", metavar="RELEASE", type=Path, help="the release directory (see below)")
    _engine(s, "serve", "which server runs the release", "--batching, --kv-cache-tokens and --max-batch-tokens set "
            "transformers'; --dtype sets vLLM's", "--dtype", "--engine vllm: the dtype vLLM runs the release in ('auto', vLLM's "
            "default: bfloat16 on a CPU, the checkpoint's on a GPU); float32 is token-exact with load_release. "
            "Default: auto")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    s.add_argument("--port", type=PORT, default=8000, help=f"TCP port to listen on, {PORT.limits} (default 8000)")
    s.add_argument("--batching", choices=["continuous", "sequential"], default="continuous",
                   help="'continuous': transformers' continuous batching (paged attention; concurrent requests share "
                        "decode steps, sampling settings are those of the first request); 'sequential': one "
                        "model.generate call at a time, each request with its own settings. Default: continuous")
    s.add_argument("--kv-cache-tokens", type=KV_TOKENS, default=8192, metavar="N",
                   help=f"continuous batching: tokens (prompts and generations of all running requests together) the "
                        f"paged KV cache holds, allocated at the first request, {KV_TOKENS.limits} (default 8192)")
    s.add_argument("--max-batch-tokens", type=BATCH_TOKENS, default=256, metavar="N",
                   help=f"continuous batching: most tokens in one forward step (prompt chunks and decode tokens), "
                        f"{BATCH_TOKENS.limits} (default 256)")


def _command(sub, name: str, summary: str, description: str, epilog: str = TERMS):
    epilog = epilog if epilog is TERMS else f"{epilog}\n\n{TERMS}"
    return sub.add_parser(name, help=summary, description=description, epilog=epilog, formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="taylormlp", formatter_class=_Formatter,
                     description="Release language models as TaylorMLP series coefficients: token-exact, throttled, "
                                 "audited.",
                     epilog=f"{TERMS}\n\n`taylormlp COMMAND --help` describes a command and its flags.")
    parser.add_argument("--version", action="version", version=f"taylormlp {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_protect(sub)
    _add_run_commands(sub)
    _add_audit(sub)
    _add_serve(sub)
    parser.commands = sub.choices
    return parser


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, a container stop), raised where the process is, so that every `finally`
    runs: a protect stopped this way removes its temporary release directory, as it does on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set from there
        signal.signal(signal.SIGTERM, _terminate)
    try:
        from . import commands  # after parsing: --help and usage errors need none of the models' libraries

        commands.quiet_libraries()
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except TaylorMLPError as exc:
        print(f"taylormlp {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"taylormlp {args.command}: error: {_one_line(_unexpected_io_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; nothing was written to the output "
              f"directory", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
