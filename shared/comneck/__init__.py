"""ComNeck core: the pieces both the edge device and the cloud gateway import.

Data path, one module per arrow:
image (``image``) -> bitstream strings (``codec``) -> y_hat (``codec``)
-> CLIP tokens (``neck``) -> CLIP tail features (``clip_split``) -> backend (``backends``) -> text,
composed once in ``pipeline``::

    from comneck import Pipeline
    pipeline = Pipeline.from_pretrained("weights/d1_1", preset="paper", device="cuda")
    answers = pipeline.answer([bitstream_bytes], ["What is in the photo? Labels: cow, horse"])
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

# compressai imports torch_geometric, whose import calls the deprecated torch.jit.script:
# a warning about a third-party internal that users can do nothing about.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

from .version import __version__

if TYPE_CHECKING:
    from .pipeline import Pipeline


def __getattr__(name: str) -> Any:
    """``comneck.Pipeline`` on first use only: the edge imports ``comneck`` without open_clip."""
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'comneck' has no attribute {name!r}")


__all__ = ["Pipeline", "__version__"]
