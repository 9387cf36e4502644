"""lm-lite: quantization (AWQ, GPTQ, SmoothQuant, calibration) writing standard checkpoints."""

__version__ = "0.1.0"
