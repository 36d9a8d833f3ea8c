"""The gradient noise scale: live estimate (``scale``) and batch advice (``advice``)."""
