"""mmcl: contrastive pretraining of image and text towers (CLIP, SigLIP) and image towers (SimCLR, MoCo, SLIP)."""
__version__ = "0.1.0"
