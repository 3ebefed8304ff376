"""Scoring edge cases: case, whitespace, separators, partial numbers, empty input."""

import pytest
from apportion_eval.holobench import group_score
from apportion_eval.longgen import item_lines
from apportion_eval.scoring import found, string_match_all, string_match_part


@pytest.mark.parametrize(
    ("answer", "prediction", "expected"),
    [
        ("1234567", "The number is 1234567.", True),
        ("1234567", "The number is 12345678.", False),  # a longer number is not the answer
        ("1234567", "The number is 123456.", False),
        ("1234567", "It is 1,234,567", True),  # thousands separators
        ("1234567", "x1234567", False),
        ("amber-falcon", "AMBER-FALCON!", True),  # case-insensitive
        ("amber-falcon", "amber-falcons", False),
        ("fox", "foxes", False),
        ("Sales: 3", "sales:   3\n", True),  # whitespace collapsed
        ("2f4b66bf-dc0e-40e0-b0a7-2ed837b6ec6e", "key 2F4B66BF-DC0E-40E0-B0A7-2ED837B6EC6E.", True),
        ("1234567", "", False),
    ],
)
def test_found(answer, prediction, expected):
    assert found(answer, prediction) is expected


def test_empty_gold_answer_is_an_error():
    with pytest.raises(ValueError, match="empty gold"):
        found("  ", "anything")


def test_match_all_and_part():
    answers = ["1111111", "2222222", "3333333", "4444444"]
    pred = "They are 1111111 and 3333333."
    assert string_match_all(answers, pred) == 0.5
    assert string_match_part(answers, pred) == 1.0
    assert string_match_all(answers, "") == 0.0
    assert string_match_part(answers, "none") == 0.0
    assert string_match_all([], "1111111") == 0.0  # nothing to find scores nothing
    # listing the same value twice does not count twice
    assert string_match_all(answers, "1111111 1111111 1111111 1111111") == 0.25


def test_group_score():
    gold = ["Finance: 2", "Legal: 1", "Sales: 3"]
    assert group_score(gold, "Finance: 2\nLegal: 1\nSales: 3") == 1.0
    assert group_score(gold, "finance - 2, legal 1, sales: 4") == pytest.approx(2 / 3)
    assert group_score(gold, "") == 0.0
    assert group_score(gold, "Sales: 33") == 0.0


def test_item_lines():
    text = (
        "1. locker 417\n2) locker 120\nsome chatter\n2. locker 999\n**3.** locker 5\n"
        "12. out of range"
    )
    lines = item_lines(text, 3)
    assert lines[1] == "locker 417" and lines[2] == "locker 120"  # the first line per item counts
    assert 3 in lines and 12 not in lines


def test_item_lines_unnumbered_answers_in_order():
    assert item_lines("417 120", 3) == {1: "417", 2: "120"}
    assert item_lines("nothing here", 3) == {}
