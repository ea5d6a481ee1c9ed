import numpy as np

from pipeline.data.sources import emoji_classes


def test_emoji_classes_have_one_drawing_per_style_sorted_by_code_point():
    classes = emoji_classes(32, ["twemoji", "openmoji", "noto"])
    assert len(classes) > 1000
    keys = [c.key for c in classes]
    assert keys == sorted(keys, key=lambda k: int(k[1:], 16))
    styles = [name for name, _ in classes[0].images]
    assert {"twemoji", "openmoji"} <= set(styles)
    assert all([n for n, _ in c.images] == styles for c in classes)


def test_drawings_are_square_rgb_on_white_and_differ_between_styles():
    item = emoji_classes(48, ["twemoji", "openmoji"], max_classes=10)[3]
    images = [np.asarray(load()) for _, load in item.images]
    for arr in images:
        assert arr.shape == (48, 48, 3)
        assert (arr[0, 0] == 255).all()  # white corner, not a dark palette background
        assert arr.std() > 10  # something is drawn
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5


def test_max_classes_spreads_over_code_points():
    full = emoji_classes(32, ["twemoji", "openmoji"])
    few = emoji_classes(32, ["twemoji", "openmoji"], max_classes=8)
    assert len(few) == 8
    assert few[0].key == full[0].key
    assert int(few[-1].key[1:], 16) > int(full[len(full) // 2].key[1:], 16)
