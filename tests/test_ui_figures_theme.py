"""The accuracy matrix's numbers are readable on every cell: white on the deep red and green
ends of its colour map, dark on the light middle (also what dark mode's inversion keeps)."""

from lorsu_demo.evaluate import AccuracyMatrix
from lorsu_demo.ui import figures


def test_matrix_numbers_take_the_ink_their_cell_needs():
    matrix = AccuracyMatrix(["low", "middle", "high"], [[2.0, 50.0, 98.0]], {})
    figure = figures.matrix_figure(matrix)
    inks = {t.get_text(): t.get_color() for t in figure.axes[0].texts}
    assert inks["2"] == "white" and inks["98"] == "white"
    assert inks["50"] == figures.INK
