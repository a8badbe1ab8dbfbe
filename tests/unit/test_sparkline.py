"""``deckard stats``'s sparkline: a share's highest value, scaled to the highest of all; a gap where nothing was."""

from __future__ import annotations

from deckard.cli.output import sparkline


def test_each_character_is_its_shares_highest_scaled_to_the_highest_of_all() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([0, 7, 0, 0], width=2) == "█▁"  # a short peak stays visible
    assert sparkline(list(range(1000)), width=10) == "▂▂▃▄▄▅▆▇▇█"  # each tenth's highest: 99, 199, …


def test_gaps_empty_and_all_zero() -> None:
    assert sparkline([3, None, None, 6]) == "▅  █"
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([None]) == " "
