"""The slowdown record of a `--slowdown` release: what the dial was asked, what it measured and how, typed.

protection/throttle.Dial builds it; the release's config.json carries it as a dict (``to_dict``, in its
"taylormlp" section under "slowdown") and the model card and the CLI read it typed (``from_dict``).  Records of
older releases lack the later fields and read with the defaults those releases were measured under: batch 1 (no
"serving_batch"), our eager runtime (no "engine"), one read (no "reads"), decode (no "workload", no "phase").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class SlowdownRecord:
    target: float
    measured: float
    serving_batch: int = 1
    phase: str = "decode"  # the phase the dial aimed at: "decode", or "request" with a workload
    workload: dict | None = None  # {"prompt_tokens": P, "new_tokens": G}
    flops_ratio: float | None = None
    bytes_ratio: float | None = None
    accepted: float | None = None  # the median of the search's reads when the choice was accepted
    reads: list = field(default_factory=list)  # every read at the serving batch of the written setting
    curve: list = field(default_factory=list)  # [{"batch", "measured", "phases"?}]
    curve_agrees: bool | None = None
    curve_read: str | None = None  # "confirming": the choice's confirming read; "own": a read of its own
    within_tolerance: bool | None = None
    engine: dict | None = None  # {"name", "version", "mode", "dtype", ...}; None: our eager runtime
    prior: float | None = None
    family: str | None = None
    machine: dict | None = None
    held_in_memory: bool | None = None
    measurements: list = field(default_factory=list)
    validations: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, record: "dict | SlowdownRecord") -> "SlowdownRecord":
        """A record as config.json holds it (keys this version does not know are dropped)."""
        if isinstance(record, cls):
            return record
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

    def to_dict(self) -> dict:
        """The record as config.json holds it (a workload only where there is one)."""
        out = asdict(self)
        if self.workload is None:
            out.pop("workload")
        return out

    @property
    def what(self) -> str:
        """What was dialed, in words."""
        return "whole-request slowdown" if self.workload else "decode slowdown"

    def summary(self) -> str:
        """One line for the CLI: the measured figure, the target and the curve."""
        at = f" at batch {self.serving_batch}" if self.serving_batch > 1 else ""
        on = (f" on workload {self.workload['prompt_tokens']}:{self.workload['new_tokens']}" if self.workload else "")
        curve = ", ".join(f"{p['measured']:.2f}x at batch {p['batch']}" for p in self.curve)
        return (f"measured {self.what}{on} {self.measured:.2f}x{at} (target {self.target}x)"
                + (f"; curve: {curve}" if curve else ""))
