"""duallora: rehearsal-free continual learning of pre-trained ViTs with DualLoRA."""

__version__ = "0.1.0"
