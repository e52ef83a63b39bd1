import os

import torch

# Under pytest-xdist each worker is its own process: one intra-op thread each
# keeps the workers from oversubscribing the cores (which slows small ops ~20x).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
