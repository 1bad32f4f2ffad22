"""ddm: decentralized diffusion models (McAllister et al., CVPR 2025).

The code lives in the top-level folders ``expert/``, ``router/``, ``coordinator/`` and ``proto/``,
installed as ``ddm.expert``, ``ddm.router``, ``ddm.coordinator`` and ``ddm.proto``.
"""

__version__ = "0.1.0"
