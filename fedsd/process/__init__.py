"""Managed child processes: Flower's commands launched with a clean environment, never outliving their parent."""
