"""veorl: Video-Enhanced Offline Reinforcement Learning as an MLOps workflow."""

__version__ = "0.1.0"
