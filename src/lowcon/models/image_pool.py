"""CycleGAN's history buffer of generated images for the discriminator update."""
from __future__ import annotations

import torch
from torch import Tensor


class ImagePool:
    """Buffer of past fakes: the discriminator sees a mix of current and older generator outputs.

    ``query`` goes image by image. While the pool holds fewer than ``pool_size`` images the image
    is stored and returned. Once full, with probability 0.5 the image is returned as is; otherwise
    a stored image chosen uniformly is returned and the new one takes its place. Returned images
    are detached (they only feed the discriminator's loss).

    Args:
        pool_size: capacity (50 in CycleGAN); 0 disables the pool (``query`` returns its input).
        generator: optional CPU ``torch.Generator`` for the random draws, for reproducible runs.

    Shape:
        ``query``: ``(B, C, H, W) -> (B, C, H, W)``; all images must share C, H, W and device.

    Example:
        >>> pool = ImagePool(50)
        >>> fake_for_d = pool.query(fake)   # doctest: +SKIP

    Reference:
        Shrivastava et al., CVPR 2017 (history of refined images); Zhu et al., CycleGAN,
        ICCV 2017, ``util/image_pool.py``.
    """

    def __init__(self, pool_size: int = 50, *, generator: torch.Generator | None = None):
        if not isinstance(pool_size, int) or pool_size < 0:
            raise ValueError(f"pool_size must be an int >= 0, got {pool_size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.pool_size = pool_size
        self.generator = generator
        self.images: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim < 2:
            raise ValueError("images must be a batched Tensor (B, ...)")
        if self.pool_size == 0:
            return images
        returned = []
        for image in images.detach():
            if len(self.images) < self.pool_size:
                # A copy, so that the pool does not keep the caller's whole batch alive.
                self.images.append(image.clone())
                returned.append(image)
            elif torch.rand((), generator=self.generator).item() < 0.5:
                returned.append(image)
            else:
                index = int(torch.randint(self.pool_size, (), generator=self.generator))
                returned.append(self.images[index])
                self.images[index] = image.clone()
        return torch.stack(returned)
