"""taylormlp: release language models as TaylorMLP series parameters instead of plain weights.

Public API (in the spirit of optimum-quanto's quantize/freeze):

    protect(model, tokenizer, calibration=None, preset="default", order=None, coverage=None) -> spec
    save_release(model, directory, tokenizer)
    load_release(directory) -> transformers causal LM whose layers' .mlp are TaylorMLP modules
"""

__version__ = "0.1.0"

from .convert import ProtectOptions, protect  # noqa: E402
from .errors import TaylorMLPError  # noqa: E402
from .release import load_release, save_release  # noqa: E402
from .runtime import TaylorMLP  # noqa: E402

__all__ = ["protect", "ProtectOptions", "save_release", "load_release", "TaylorMLP", "TaylorMLPError"]
