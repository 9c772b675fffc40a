"""mmdiff: multimodal image-and-text diffusion with one shared DiT and classifier-free guidance both ways."""

__version__ = "0.1.0"
