"""Suite-wide settings: offline Hugging Face, one torch thread.

Tiny models on a shared 2-core machine: with torch's default thread pool every small op pays
tens of milliseconds of OpenMP contention; one thread is faster and more stable.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch-free core tests still run
    pass
