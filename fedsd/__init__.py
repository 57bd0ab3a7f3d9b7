"""fedsd: federated, on-device adaptation of speech emotion recognition by self-distillation."""

__version__ = "0.1.0"
