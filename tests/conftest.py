"""Suite-wide settings: one intra-op thread. Tests use tiny tensors, where thread hand-offs cost more
than they win on a loaded 2-core machine, and subprocess tests set their own threads."""

import torch

torch.set_num_threads(1)
