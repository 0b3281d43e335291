"""Networks: AECR-Net; CUT's ResNet generator and PatchGAN discriminator; SinCUT's StyleGAN2 ones."""
from .aecrnet import AECRNET_VARIANTS, AECRNet, build_aecrnet
from .gan_loss import GANLoss, gan_loss
from .image_pool import ImagePool
from .init import init_weights
from .patch_discriminator import PatchDiscriminator
from .resnet_generator import ResnetGenerator
from .stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
