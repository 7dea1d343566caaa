"""collabdm_jax: one-shot collaborative dataset distillation (CollabDM) in JAX.

Holland et al., "One-Shot Collaborative Data Distillation", ECAI 2024.
"""

__version__ = "0.1.0"
