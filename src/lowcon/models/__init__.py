"""Networks: AECR-Net, and CUT's ResNet generator and PatchGAN discriminator."""
from .aecrnet import AECRNET_VARIANTS, AECRNet, build_aecrnet
from .gan_loss import GANLoss, gan_loss
from .image_pool import ImagePool
from .init import init_weights
from .patch_discriminator import PatchDiscriminator
from .resnet_generator import ResnetGenerator
