import pytest
import torch

from lowcon.models.image_pool import ImagePool


def _image(ident: int) -> torch.Tensor:
    """A 1-image batch whose pixels all equal its id, so returned images can be identified."""
    return torch.full((1, 2, 3, 3), float(ident))


def _ids(batch: torch.Tensor) -> list[int]:
    return [int(image[0, 0, 0]) for image in batch]


def test_pool_size_zero_returns_the_input():
    images = torch.randn(3, 2, 4, 4)
    assert ImagePool(0).query(images) is images


def test_returns_inputs_while_filling_then_a_mix_and_never_grows_past_pool_size():
    pool = ImagePool(5, generator=torch.Generator().manual_seed(0))
    for ident in range(5):
        assert _ids(pool.query(_image(ident))) == [ident]
    assert len(pool) == 5
    stored = {0, 1, 2, 3, 4}
    from_pool = 0
    for ident in range(5, 405):
        (returned,) = _ids(pool.query(_image(ident)))
        if returned == ident:
            assert stored == set(_ids(torch.stack(pool.images)))  # pool untouched
        else:
            # An older image comes back and the new one takes its place.
            assert returned in stored
            stored = stored - {returned} | {ident}
            from_pool += 1
        assert set(_ids(torch.stack(pool.images))) == stored
        assert len(pool) == 5
    assert 0.4 < from_pool / 400 < 0.6


def test_batch_query_fills_then_swaps_image_by_image():
    pool = ImagePool(3, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([_image(i) for i in range(4)])
    out = pool.query(batch)
    assert out.shape == batch.shape
    assert _ids(out)[:3] == [0, 1, 2]
    assert _ids(out)[3] in {0, 1, 2, 3}
    assert len(pool) == 3


def test_seeded_generator_makes_queries_reproducible_and_outputs_are_detached():
    def run(seed):
        pool = ImagePool(4, generator=torch.Generator().manual_seed(seed))
        return [_ids(pool.query(torch.cat([_image(2 * i), _image(2 * i + 1)]))) for i in range(30)]

    assert run(3) == run(3)
    fake = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert not ImagePool(4).query(fake * 2).requires_grad


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(-1)
    with pytest.raises(TypeError, match="generator"):
        ImagePool(5, generator=0)
