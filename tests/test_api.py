import loctune


def test_every_public_name_resolves():
    missing = [n for n in loctune.__all__ if getattr(loctune, n, None) is None]
    assert not missing


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute"):
        loctune.not_a_thing  # noqa: B018
