"""The built-in shapes data set: deterministic by (seed, index), at least 8 classes, captions that
name the drawn class, pixels that show the named colour."""

import numpy as np
import pytest

from vlmfast.data.synthetic import CLASSES, COLOURS, SyntheticShapes, caption_vocabulary


def test_samples_are_a_function_of_seed_and_index():
    a, b = SyntheticShapes(50, seed=3), SyntheticShapes(50, seed=3)
    for i in (0, 7, 49):
        assert np.array_equal(a[i].image, b[i].image) and a[i].caption == b[i].caption
    other = SyntheticShapes(50, seed=4)
    assert any(not np.array_equal(a[i].image, other[i].image) for i in range(10))
    images, captions, labels = a.batch([3, 1])
    assert np.array_equal(images[0], a[3].image) and captions[1] == a[1].caption and labels[0] == a[3].label


def test_classes_captions_and_pixels_agree():
    assert len(CLASSES) >= 8
    ds = SyntheticShapes(200, image_size=32, seed=0)
    images, captions, labels = ds.batch(range(200))
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(len(CLASSES)))  # every class occurs
    vocab = set(caption_vocabulary())
    for caption, label, image in zip(captions, labels, images):
        colour, shape = CLASSES[label].split()
        words = caption.split()
        assert shape in words and set(words) <= vocab
        assert set(words) & set(COLOURS) <= {colour}  # a colour, when named, is the drawn one
        # the most saturated pixel is the named colour (nearest reference colour)
        flat = image.reshape(-1, 3).astype(int)
        brightest = flat[np.argmax(flat.max(1) - flat.min(1))]
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - brightest).sum())
        assert nearest == colour, (caption, brightest)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="length"):
        SyntheticShapes(0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(10, image_size=4)
    with pytest.raises(IndexError, match="index"):
        SyntheticShapes(10)[10]
