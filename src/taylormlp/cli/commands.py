"""The CLI's commands, one function each (`cmd_<name>(args)`); cli/parser.py parses the arguments and imports this module
only then, so that `taylormlp --help` does not load the models' libraries."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..attacks.audit import run_audit
from ..common.choices import WORKLOAD_NEW_TOKENS
from ..common.errors import TaylorMLPError
from ..common.paths import check_output_file, dump_json
from ..common.progress import quiet
from ..measure import engines
from ..measure.compare import print_comparison, read_prompts
from ..measure.engines import BenchRequest, CompareRequest, ServeRequest
from ..measure.generate import generate_text
from ..measure.workload import Workload
from ..protection import preflight
from ..protection.flow import protect_to_release
from ..release.inspect import inspect_release
from ..release.kinds import refuse_non_release, refuse_release
from ..release.sources import load_any
from .demo import run_demo

SECURITY_POINTER = ("Note: TaylorMLP slows use and hides W_down from casual inspection, but it does not keep the "
                    "weights from a determined attacker; see README 'Security and limits' and run `taylormlp audit`.")


def quiet_libraries() -> None:
    """With TAYLORMLP_QUIET=1, transformers' own progress bars and warnings stay off stderr as well."""
    if not quiet():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _check_outputs(force: bool, **paths) -> None:
    """Output files named by flags (--json, --plot) can be written, and replace no existing file without --force:
    checked before any work is done."""
    for flag, path in paths.items():
        if path is not None:
            check_output_file(path, f"--{flag}", force)


def _check_inputs(sources=(), releases=()) -> None:
    """Before anything is loaded: no SOURCE argument is a release (`sources`: (where, path) pairs, `where` naming
    the flag or argument as the user typed it) and every RELEASE argument is one."""
    for where, path in sources:
        if path is not None:
            refuse_release(path, where)
    for path in releases:
        refuse_non_release(path)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e6:.3f} MB"


def describe_release(path, info: dict) -> list[str]:
    """`taylormlp inspect`'s table for people: what is protected, what `rest` is, sizes, checks passed."""
    protected = sum(row["protected"] for row in info["layers"])
    rest = sum(row["rest"] for row in info["layers"])
    total = max(protected + rest, 1)
    manifest = info.get("manifest", {})
    pieces = info["pieces_per_protected_channel"]
    lines = [
        f"release {path}",
        f"  manifest    passed: {manifest.get('files', '?')} files, every size and sha256 as recorded",
        f"  model       {info['architecture']}, {len(info['layers'])} layers ({info['family']} MLP, activation "
        f"{info['activation']}); release format {info['format_version']}",
        f"  series      {info['basis']} basis, order N = {info['order']}, preset {info['preset']}"
        + ("" if pieces is None else f", {pieces:.2f} series pieces per protected channel"),
        f"  protected   {protected} of {total} MLP channels ({100 * protected / total:.1f}%): down projection stored "
        f"only as series coefficients",
        f"  rest        {rest} channels ({100 * rest / total:.1f}%): unprotected, kept as an ordinary MLP whose "
        f"weights are released as they are",
        f"  size        {_size(info['size_bytes'])} on disk",
    ]
    val = info.get("validation")
    if val and val.get("tokens"):
        seqs = (f" ({val['sequences_exact']}/{val['sequences']} held-out prompts identical)"
                if val.get("sequences") else "")
        lines.append(f"  validation  {val['tokens_matched']}/{val['tokens']} tokens matched the original{seqs}; max "
                     f"logit error {val['max_logit_error']:.3g} (measured by protect, on its machine)")
    else:
        lines.append("  validation  none recorded (made with an explicit coverage and no validation prompts)")
    lines.append("  layer  protected  pieces  rest")
    for row in info["layers"]:
        lines.append(f"  {row['layer']:5}  {row['protected']:9}  {row.get('pieces') or row['protected']:6}  "
                     f"{row['rest']:4}")
    return lines


def _check_plot_format(path) -> None:
    if path is None or not Path(path).suffix:
        return
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if Path(path).suffix[1:].lower() not in formats:
        raise TaylorMLPError(f"--plot {path}: matplotlib cannot write {Path(path).suffix!r} files; use one of "
                             f"{', '.join('.' + f for f in sorted(formats))} (e.g. bench.png)")


# ---------------------------------------------------------------- commands


def cmd_protect(args) -> int:
    _check_inputs(sources=[("SOURCE", args.source)])
    summary = protect_to_release(
        args.source, args.out, preset=args.preset, order=args.order, basis=args.basis, coverage=args.coverage,
        slowdown=args.slowdown, serving_batch=args.serving_batch, calibration_file=args.calibration, dtype=args.dtype,
        seed=args.seed, chat=False if args.no_chat else None, force=args.force, error_budget=args.error_budget,
        max_pieces=args.max_pieces, calibration_samples=args.calibration_samples, batch_size=args.batch_size,
        device=args.device, dry_run=args.dry_run, engine=args.engine, engine_dtype=args.engine_dtype,
        rounds=args.rounds, workload=args.workload)
    if args.dry_run:
        print("\n".join(summary["estimate"].table()))
        preflight.check(summary["estimate"])  # the real run's refusal, exit status 2 (nothing was written)
        print("dry run: nothing was written; the run would start")
        return 0
    print(f"wrote {summary['out']}: coverage {summary['coverage']:.4f}, order {summary['order']}, "
          f"basis {summary['basis']}, {summary['size_bytes'] / 1e6:.1f} MB")
    if summary.get("slowdown"):
        print(summary["slowdown"].summary())
    print(SECURITY_POINTER)
    return 0


def cmd_generate(args) -> int:
    if args.base:
        refuse_release(args.release, "--base", hint="; drop --base to run the release")
    else:
        refuse_non_release(args.release, hint=" (or pass --base to run an original model SOURCE)")
    model, tokenizer = load_any(args.release, base=args.base)
    start = time.perf_counter()
    text, n = generate_text(model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    print(text)
    print(f"[{n} tokens in {elapsed:.2f}s]", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    _check_inputs(sources=[("--leak-check", args.leak_check)], releases=[args.release])
    info = inspect_release(args.release, leak_source=args.leak_check)
    if args.json:
        print(json.dumps(info, indent=1))
        return 1 if info.get("leak_check", {}).get("leaks") else 0
    print("\n".join(describe_release(args.release, info)))
    if "leak_check" in info:
        lc = info["leak_check"]
        print(f"leak check against {args.leak_check}: {len(lc['leaks'])} leaks in {lc['tensors_scanned']} tensors")
        for row in lc["tensors"]:
            print(f"  {row['name']:60} {row['kind']}")
        for leak in lc["leaks"]:
            print(f"  LEAK: {leak}")
        return 1 if lc["leaks"] else 0
    return 0


def cmd_compare(args) -> int:
    _check_outputs(args.force, json=args.json)
    _check_inputs(sources=[("SOURCE", args.source)], releases=[args.release])
    engine = engines.get(args.engine, "compare")
    engine.require()  # before reading anything (vLLM: `make vllm-setup`)
    request = CompareRequest(args.source, args.release, tuple(read_prompts(args.prompts)), args.max_new_tokens,
                             args.dtype)
    result = engine.compare(request)
    print_comparison(result)
    if args.json:
        dump_json(result, args.json)
    return 0


def cmd_demo(args) -> int:
    run_demo(args.out, preset=args.preset, max_new_tokens=args.max_new_tokens, force=args.force)
    return 0


def cmd_bench(args) -> int:
    _check_outputs(args.force, json=args.json, plot=args.plot)
    _check_plot_format(args.plot)
    _check_inputs(sources=[("SOURCE", args.source)], releases=args.releases)
    given = {"concurrency": tuple(args.serve_concurrency or ()), "requests": args.serve_requests,
             "tokens": args.serve_tokens}  # unset: ServeOptions' defaults
    request = BenchRequest(args.source, tuple(args.releases), batch_sizes=args.batch_sizes, tokens=args.tokens,
                           repeats=args.repeats, dtype=args.dtype, device=args.device, workload=_workload(args),
                           serve={k: v for k, v in given.items() if v} or None, json_path=args.json,
                           plot_path=args.plot)
    engines.get(args.engine, "bench").bench(request)
    return 0


def _workload(args) -> Workload | None:
    """bench's --prompt-tokens P --new-tokens G as a Workload (None without --prompt-tokens)."""
    if args.prompt_tokens is None:
        if args.new_tokens is not None:
            raise TaylorMLPError(f"--new-tokens {args.new_tokens} sets a workload's generated tokens and needs "
                                 f"--prompt-tokens P; add it (e.g. --prompt-tokens 512) or use --tokens")
        return None
    return Workload(args.prompt_tokens, args.new_tokens or WORKLOAD_NEW_TOKENS)


def cmd_audit(args) -> int:
    _check_outputs(args.force, json=args.json)
    _check_inputs(sources=[("--original", args.original)], releases=[args.release])
    run_audit(args.release, original=args.original, json_path=args.json, attacks=args.attacks.split(","),
              stream=args.stream)
    return 0


def cmd_serve(args) -> int:
    refuse_non_release(args.release)
    return engines.get(args.engine, "serve").serve(ServeRequest(
        args.release, host=args.host, port=args.port, dtype=args.dtype, batching=args.batching,
        kv_cache_tokens=args.kv_cache_tokens, max_batch_tokens=args.max_batch_tokens))
