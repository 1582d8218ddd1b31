"""po_ray: distributed preference optimisation on Ray Train + DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
