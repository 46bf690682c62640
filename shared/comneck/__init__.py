"""ComNeck core: the pieces both the edge device and the cloud gateway import.

Data path, one module per arrow:
image (``image``) -> bitstream strings (``codec``) -> y_hat (``codec``)
-> CLIP tokens (``neck``) -> CLIP tail features (``clip_split``) -> backend -> text.
"""

import warnings

# compressai imports torch_geometric, whose import calls the deprecated torch.jit.script:
# a warning about a third-party internal that users can do nothing about.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

__version__ = "0.1.0"
