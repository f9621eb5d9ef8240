import os

import torch

# Without a GPU, loctune's Triton kernels run in Triton's interpreter on CPU tensors.
# It is chosen when the kernels are defined, so it must be set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
