"""Data: image reading by content, paired and unpaired datasets, haze synthesis, embedded photos."""
from .io import ImageReadError, list_images, read_image, write_image
from .paired import HazyFolder, PairedDehazeDataset, scene_ids, split_ids
from .unpaired import SingleImagePairDataset, UnpairedDataset, resolve_unpaired_root
