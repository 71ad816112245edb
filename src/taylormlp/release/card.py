"""The model card (README.md) of a release: what it is, how to load it, what it was made from and by what.

The card is a list of sections, each a list of lines built by one function below; `model_card` joins them.  A new
section is one more function and one more entry in that list.

The base model is named as it was given (a built-in name, a .gguf file, a Hugging Face directory) with its licence
field where the source has one: ``license:`` in the front matter of the directory's README.md (the Hugging Face
model-card convention), or ``general.license`` in a GGUF file's metadata.  A release is made from the base model's
weights, so the base model's terms (Gemma's differ from SmolLM2's Apache-2.0) apply to it.

The throttle rows say what `--slowdown` asked for, what was measured at the serving batch, the slowdown curve
over batch sizes, the FLOPs and bytes ratios and the machine; every value comes from the release spec's
slowdown record (release/slowdown.SlowdownRecord, made by protection/throttle.Dial).
"""

from __future__ import annotations

from pathlib import Path

from ..common import __version__
from ..common.choices import BUILTIN_MODELS, PHASES
from ..common.errors import TaylorMLPError
from .slowdown import SlowdownRecord

FRONT_MATTER_KEYS = ("license", "license_name", "license_link")  # Hugging Face model-card metadata we repeat


def readme_licence(model_dir) -> dict:
    """The licence fields of a Hugging Face model directory's README.md front matter ({} when there are none).

    Only top-level ``key: value`` lines between the opening and closing ``---`` are read (no YAML library needed
    for three scalar keys); a list value such as ``license: [mit]`` is kept as written."""
    path = Path(model_dir) / "README.md"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    found = {}
    for line in lines[1:]:
        if line.strip() == "---":
            return found
        key, sep, value = line.partition(":")
        if sep and key in FRONT_MATTER_KEYS and value.strip():  # top-level only: an indented key keeps its spaces
            found[key] = value.strip().strip("'\"")
    return {}  # no closing ---: not front matter


def gguf_licence(gguf) -> dict:
    """``general.license`` (and ``general.name``) from a GGUF file's metadata; {} when absent or unreadable."""
    try:
        from gguf import GGUFReader  # heavy optional reader, only needed for GGUF sources

        fields = GGUFReader(gguf).fields
    except Exception:  # noqa: BLE001 - an unreadable file only means no licence field to repeat
        return {}
    found = {}
    for key, name in (("general.license", "license"), ("general.name", "name")):
        if key in fields:
            try:
                found[name] = str(fields[key].contents())
            except Exception:  # noqa: BLE001 - a malformed field is left out, not guessed
                pass
    return found


def base_model(source) -> dict:
    """What the card says about SOURCE: {"source", "kind", "license", "license_from", ...}; never raises (a card
    must not stop a release that protect has already made)."""
    info = {"source": str(source) if source is not None else None, "kind": None, "license": None,
            "license_from": None}
    if source is None:
        return info
    text = str(source)
    gguf = None
    if text in BUILTIN_MODELS:
        info["kind"] = f"built-in: {BUILTIN_MODELS[text].description}, pip package {BUILTIN_MODELS[text].package}"
        try:
            gguf = BUILTIN_MODELS[text].gguf_path()
        except TaylorMLPError:
            gguf = None
    elif text.lower().endswith(".gguf") and Path(text).is_file():
        info["kind"], gguf = "GGUF file", Path(text)
    elif Path(text).is_dir():
        info["kind"] = "Hugging Face model directory"
        fields = readme_licence(text)
        if fields:
            info.update(fields, license_from="license in its README.md front matter")
    if gguf is not None:
        fields = gguf_licence(gguf)
        if "name" in fields:
            info["name"] = fields["name"]
        if "license" in fields:
            info.update(license=fields["license"], license_from="general.license in its GGUF metadata")
    return info


def machine_words(machine: dict | None) -> str:
    """Where a slowdown was measured, in words: the GPU's name, or the CPU with its torch threads."""
    if not machine:
        return "the machine that ran protect"
    return machine.get("gpu") or f"{machine.get('cpu')}, {machine.get('threads')} threads"


def engine_words(engine: dict | None) -> str:
    """What timed a slowdown, in words; records written before the engine was recorded were timed on our runtime."""
    engine = engine or {"name": "taylormlp", "mode": "eager"}
    if engine["name"] == "vllm":
        release = engine.get("release_class")
        how = ("natively, as vLLM's own model (taylormlp's plugin)" if release and release != "TransformersForCausalLM"
               else "on its Transformers backend")
        return (f"vLLM {engine.get('version', '?')} ({engine.get('mode')}, {engine.get('dtype')}): the original on "
                f"vLLM's own model code, the release {how}")
    return f"taylormlp's own {engine.get('mode', 'eager')} runtime" + (f" ({engine['dtype']})" if "dtype" in engine
                                                                       else "")


def slowdown_rows(slowdown: "SlowdownRecord | dict") -> list[str]:
    """Markdown table rows ("| field | value |") for a slowdown record (slowdown.SlowdownRecord, or the dict a
    config.json holds; older records read with its defaults)."""
    rec = SlowdownRecord.from_dict(slowdown)
    batch = rec.serving_batch
    where = f"{machine_words(rec.machine)}, {engine_words(rec.engine)}"
    work = rec.workload
    if work:
        on = (f" on workload {work['prompt_tokens']}:{work['new_tokens']} ({batch} distinct prompts of "
              f"{work['prompt_tokens']} tokens, {work['new_tokens']} generated tokens each: prefill and decode)")
    else:
        on = f" (throughput of {batch} concurrent sequences, release / original)"
    rows = [f"| requested {rec.what} | {rec.target}x at batch {batch}{on} |",
            f"| measured {rec.what} | {rec.measured:.2f}x at batch {batch} (interleaved with the "
            f"original, on {where}; a slowdown is a property of the machine and of the batch size) |"]
    if rec.curve:
        rows.append("| measured slowdown curve (batch: slowdown) | "
                    + ", ".join(f"{point['batch']}: {point['measured']:.2f}x" for point in rec.curve)
                    + (" (the choice's confirming read: one interleaved run) |" if rec.curve_read == "confirming"
                       else " (one interleaved run after the choice) |"))
    for point in rec.curve:
        if point.get("phases"):
            rows.append(f"| prefill / decode / request slowdown at batch {point['batch']} | "
                        + " / ".join(f"{point['phases'][phase]:.2f}x" for phase in PHASES)
                        + " (time to first token; the other tokens; the whole request) |")
    if rec.reads:
        agrees = {True: "yes", False: "no"}.get(rec.curve_agrees, "not recorded")
        rows.append(f"| reads at batch {batch} (the measured figure is their median) | "
                    + ", ".join(f"{r:.2f}x" for r in rec.reads)
                    + f"; the curve at batch {batch} within ±10% of it: {agrees} |")
    if rec.flops_ratio:
        rows.append(f"| FLOPs per token, release / original | {rec.flops_ratio:.2f}x |")
    if rec.bytes_ratio:
        rows.append(f"| parameter bytes read per decoded token, release / original | {rec.bytes_ratio:.2f}x "
                    f"(what a memory-bound decoder pays) |")
    return rows


def header_section() -> list[str]:
    return [
        "# TaylorMLP release",
        "",
        "This model's MLP blocks are released as series coefficients Θ₀..Θ_N (TaylorMLP, Wang et al., EMNLP 2024)",
        "instead of plain down-projection weights. Load it with `taylormlp.load_release(DIR)` or",
        "`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`; stock classes of the base architecture",
        "refuse it (its config.json names no real activation), as they cannot build its MLPs.",
    ]


def settings_section(spec: dict, fidelity: dict | None = None,
                     slowdown: "SlowdownRecord | dict | None" = None) -> list[str]:
    val = spec.get("validation") or {}
    lines = [
        "| field | value |",
        "| --- | --- |",
        f"| basis | {spec['basis']} |",
        f"| order N | {spec['order']} |",
        f"| preset | {spec.get('preset')} |",
        f"| coverage (protected share of MLP channels) | {spec['coverage']:.4f} |",
        f"| calibration tokens | {spec.get('calibration', {}).get('tokens')} |",
    ]
    if val:
        lines.append(f"| validation tokens matched | {val['tokens_matched']}/{val['tokens']} "
                     f"(max logit error {val['max_logit_error']:.4g}) |")
    if slowdown:
        lines += slowdown_rows(slowdown)
    for key, value in (fidelity or {}).items():
        lines.append(f"| {key} | {value} |")
    return lines


def base_model_section(base: dict | None) -> list[str]:
    base = base or {}
    if not base.get("source"):
        return ["## Base model", "", "Not recorded (the release was saved from a model in memory whose source is "
                "unknown). The base model's own licence terms apply to this release."]
    named = f"`{base['source']}`" + (f" ({base['kind']})" if base.get("kind") else "")
    if base.get("name"):
        named += f", named {base['name']!r} in its metadata"
    lines = ["## Base model", "", f"Made from {named}."]
    if base.get("license"):
        licence = base["license"]
        extra = [f"{key} {base[key]}" for key in ("license_name", "license_link") if base.get(key)]
        lines.append(f"Licence of the base model: **{licence}**" + (f" ({'; '.join(extra)})" if extra else "")
                     + f", from {base['license_from']}.")
    else:
        lines.append("The source states no licence field (no `license:` in a README.md front matter, no "
                     "`general.license` in GGUF metadata).")
    lines.append("This release is derived from the base model's weights: the base model's terms apply to it.")
    return lines


def security_section() -> list[str]:
    return ["Security: TaylorMLP does not keep the MLP weights from a determined attacker; see the",
            "taylormlp README, section 'Security and limits', and run `taylormlp audit DIR`."]


def provenance_section() -> list[str]:
    return [f"Written by taylormlp {__version__}."]


def model_card(spec: dict, fidelity: dict | None = None, slowdown: "SlowdownRecord | dict | None" = None,
               base: dict | None = None) -> str:
    """The release's README.md: the sections above in order, separated by blank lines."""
    sections = [
        header_section(),
        settings_section(spec, fidelity, slowdown),
        base_model_section(base),
        security_section(),
        provenance_section(),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"
