"""Metrics: PSNR, SSIM under named protocols, FID and KID."""
from .protocols import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol
from .psnr import psnr
from .ssim import ssim
