"""The validation split of wikitext-2 valid.txt (vptq/splits.py, the quality issue): calibration and
selection parts are disjoint, in order, together the whole file, and split where documented."""

from __future__ import annotations

import pytest

from vptq.pipeline import PACKAGE_CALIB
from vptq.splits import split_valid, write_parts


def test_the_split_of_wikitext2_valid_is_disjoint_whole_and_where_documented(tmp_path):
    text = PACKAGE_CALIB.read_text(encoding="utf-8")
    calib, select = split_valid(text)
    assert calib + select == text  # nothing lost, nothing shared, calibration first
    assert (len(calib), len(select)) == (931_760, 188_432)
    assert select.startswith(" = Exit Through the <unk> @-@ E @-@ Mart = \n")
    # disjoint tokens: no selection window can be drawn from calibration text (no 200-character
    # stretch of the selection part occurs in the calibration part)
    assert not any(select[i:i + 200] in calib for i in range(0, len(select) - 200, 5000))
    c, s = write_parts(PACKAGE_CALIB, tmp_path)
    assert c.read_text(encoding="utf-8") == calib and s.read_text(encoding="utf-8") == select


def test_a_text_without_a_late_article_heading_is_refused():
    with pytest.raises(ValueError, match="no article heading"):
        split_valid(" = Only = \n" + "words\n" * 100)
