"""The sampling tools' command-line parsing: labels by id and name, guidance interval, guided channels."""

from __future__ import annotations

import pytest

from latentdit.cli.sampling import parse_guidance_interval, parse_guided_channels, parse_labels
from latentdit.errors import LatentDiTError

try:
    from sampling_helpers import CLASS_NAMES
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import CLASS_NAMES


def test_labels_by_id_and_by_name():
    assert parse_labels("0,3,Trouser", 4, CLASS_NAMES) == [0, 3, 1]
    assert parse_labels("t-shirt/top, dress", 4, CLASS_NAMES) == [0, 3]
    assert parse_labels([2, "Pullover"], 4, CLASS_NAMES) == [2, 2]
    assert parse_labels("1,2", 4, None) == [1, 2]


def test_unknown_class_name_lists_valid_names():
    with pytest.raises(LatentDiTError) as e:
        parse_labels("Trouser,Sock", 4, CLASS_NAMES)
    assert "'Sock'" in str(e.value) and "T-shirt/top, Trouser, Pullover, Dress" in str(e.value)


@pytest.mark.parametrize("spec", ["4", "-1", "0,10"])
def test_out_of_range_class_id(spec):
    with pytest.raises(LatentDiTError, match=r"out of range.*0\.\.3"):
        parse_labels(spec, 4, CLASS_NAMES)


def test_class_name_without_names_in_checkpoint_and_empty_labels():
    with pytest.raises(LatentDiTError, match="no class names"):
        parse_labels("Trouser", 1000, None)
    with pytest.raises(LatentDiTError, match="no class labels"):
        parse_labels(" , ", 4, CLASS_NAMES)



def test_guidance_interval_and_guided_channels_flags():
    assert parse_guidance_interval(None) is None
    assert parse_guidance_interval(" 0, 700 ") == (0.0, 700.0)
    assert parse_guidance_interval("0.2,0.9") == (0.2, 0.9)
    for bad in ("5", "1,2,3", "a,b", ""):
        with pytest.raises(LatentDiTError, match=r"--guidance-interval\) must be LO,HI"):
            parse_guidance_interval(bad)
    assert parse_guided_channels("all") is None and parse_guided_channels(None) is None
    assert parse_guided_channels("3") == 3
    with pytest.raises(LatentDiTError, match="guided channels must be 'all' or an integer"):
        parse_guided_channels("two")
