"""The shipped table of published per-finding AUROC: read, checked, and set beside ours."""
import numpy as np
import pandas as pd
import pytest

from fedxray import LABELS
from fedxray.published import COLUMNS, compare_with_published, published_auroc


def _value(table: pd.DataFrame, source: str, finding: str) -> float:
    return table.set_index(["source", "finding"]).loc[(source, finding), "auroc"]


def test_the_shipped_table_reads_and_covers_every_finding_of_each_source_once():
    table = published_auroc()
    assert list(table.columns) == list(COLUMNS)
    assert set(table["source"]) == {"wang2017", "chexnet2017"}
    for source, rows in table.groupby("source"):
        assert sorted(rows["finding"]) == sorted(LABELS), source
    assert table["auroc"].dtype == float
    assert (table[["citation", "where", "verified_against"]] != "").all().all()


def test_values_are_those_printed_in_the_sources():
    table = published_auroc()
    # Wang et al., arXiv:1705.02315v5 Table 17, ChestX-ray14 column (ResNet-50, published split).
    assert _value(table, "wang2017", "Atelectasis") == 0.7003
    assert _value(table, "wang2017", "Cardiomegaly") == 0.8100
    assert _value(table, "wang2017", "Pleural_Thickening") == 0.6835     # printed as "PT"
    assert _value(table, "wang2017", "Hernia") == 0.8717
    # Rajpurkar et al. (CheXNet), arXiv:1711.05225v3 Table 2, column "CheXNet (ours)".
    assert _value(table, "chexnet2017", "Atelectasis") == 0.8094
    assert _value(table, "chexnet2017", "Pneumonia") == 0.7680
    assert _value(table, "chexnet2017", "Emphysema") == 0.9371
    assert _value(table, "chexnet2017", "Hernia") == 0.9164
    assert set(table.loc[table["source"] == "wang2017", "split"]) == {"official"}
    assert set(table.loc[table["source"] == "chexnet2017", "split"]) != {"official"}


def _write(tmp_path, rows):
    path = tmp_path / "published.csv"
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)
    return path


def _row(source="paper", finding="Effusion", auroc="0.8"):
    return [source, finding, auroc, "official", "model", "citation", "Table 1, p. 2", "read here"]


@pytest.mark.parametrize("bad, message", [
    (_row(finding="Pleural Thickening"), r"line 3 \(source 'paper', finding 'Pleural Thickening'\): unknown finding"),
    (_row(auroc="1.2"), r"line 3 .*auroc '1.2' is not a number in \(0.5, 1\)"),
    (_row(auroc="0.5"), r"line 3 .*auroc '0.5' is not a number"),
    (_row(auroc="n/a"), r"line 3 .*auroc 'n/a' is not a number"),
    (_row(), r"line 3 \(source 'paper', finding 'Effusion'\): duplicate \(source, finding\)"),
])
def test_a_bad_row_is_refused_naming_its_line(tmp_path, bad, message):
    path = _write(tmp_path, [_row(), bad])
    with pytest.raises(ValueError, match=message):
        published_auroc(path)


def test_a_missing_column_is_refused(tmp_path):
    path = tmp_path / "published.csv"
    pd.DataFrame([_row()], columns=list(COLUMNS)).drop(columns="where").to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['where'\]"):
        published_auroc(path)


def test_compare_aligns_by_finding_not_by_position():
    published = published_auroc()
    ours = pd.Series(np.linspace(0.6, 0.9, len(LABELS)), index=list(LABELS))
    shuffled = ours.iloc[::-1].copy()
    shuffled["mean"] = 0.123                                   # as in plots.auroc_table: ignored
    table = compare_with_published(shuffled, name="fedavg", published=published)
    assert list(table.index) == [*LABELS, "mean"]
    assert list(table.columns) == ["fedavg", "wang2017", "chexnet2017"]
    pd.testing.assert_series_equal(table.loc[list(LABELS), "fedavg"], ours, check_names=False)
    assert table.loc["Hernia", "wang2017"] == 0.8717
    assert table.loc["Hernia", "chexnet2017"] == 0.9164
    assert table.loc["mean", "fedavg"] == pytest.approx(ours.mean())
    assert table.loc["mean", "chexnet2017"] == pytest.approx(
        published.loc[published["source"] == "chexnet2017", "auroc"].mean())
    assert table.attrs["comparable"]["wang2017"].startswith("yes")
    assert table.attrs["comparable"]["chexnet2017"].startswith("no")


def test_compare_leaves_a_missing_finding_out_of_every_mean_and_refuses_unknown_names():
    ours = pd.Series(0.7, index=list(LABELS)).drop("Hernia")
    table = compare_with_published(ours)
    assert np.isnan(table.loc["Hernia", "ours"])
    wang = published_auroc().query("source == 'wang2017' and finding != 'Hernia'")["auroc"]
    assert table.loc["mean", "wang2017"] == pytest.approx(wang.mean())     # the same 13 findings
    with pytest.raises(ValueError, match="Pleural Thickening"):
        compare_with_published(pd.Series({"Pleural Thickening": 0.7}))
