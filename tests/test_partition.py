import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedxray.data import LABELS, NO_FINDING, read_metadata, split_by_patient
from fedxray.partition import client_finding_table, label_skew, partition

NIH_METADATA = Path(__file__).resolve().parents[1].parent / "shared" / "nih-metadata"


def make_train(n_patients: int = 400, seed: int = 0) -> pd.DataFrame:
    """A metadata-like table: 1-4 images per patient, findings clustered per patient, AP/PA views."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in rng.permutation(np.arange(1000, 1000 + n_patients)):
        # Each patient leans towards one finding (or none), so label skew is possible at all.
        favourite = rng.integers(len(LABELS) + 1)
        view = rng.choice(["AP", "PA"], p=[0.4, 0.6])
        for f in range(rng.integers(1, 5)):
            y = (rng.random(len(LABELS)) < 0.01).astype(np.uint8)
            if favourite < len(LABELS) and rng.random() < 0.8:
                y[favourite] = 1
            v = view if rng.random() < 0.85 else ("PA" if view == "AP" else "AP")
            rows.append({"image": f"{pid:08d}_{f:03d}.png", "patient_id": int(pid), "view": v,
                         "age": 50.0, "sex": "M", "follow_up": f, **dict(zip(LABELS, y))})
    frame = pd.DataFrame(rows)
    frame[list(LABELS)] = frame[list(LABELS)].astype(np.uint8)
    return frame


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return make_train()


def patient_sets(parts):
    return [set(p["patient_id"]) for p in parts]


def assert_valid(parts, train, num_clients):
    assert len(parts) == num_clients
    sets = patient_sets(parts)
    assert sum(len(s) for s in sets) == len(set().union(*sets)), "a patient is on two clients"
    assert set().union(*sets) == set(train["patient_id"]), "a patient is missing"
    assert sum(len(p) for p in parts) == len(train)
    for p in parts:
        assert list(p.columns) == list(train.columns)
        assert list(p.index) == list(range(len(p)))
        # Rows keep train's order.
        position = train.reset_index(drop=True).reset_index().set_index("image")["index"]
        assert position[p["image"]].is_monotonic_increasing


SCHEME_KW = [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("quantity", {"alpha": 0.5}),
             ("column", {})]


@pytest.mark.parametrize("scheme, kw", SCHEME_KW)
def test_disjoint_covering_deterministic(train, scheme, kw):
    k = 2 if scheme == "column" else 5
    parts = partition(train, k, scheme=scheme, seed=1, **kw)
    assert_valid(parts, train, k)
    again = partition(train, k, scheme=scheme, seed=1, **kw)
    assert all(a.equals(b) for a, b in zip(parts, again))
    shuffled = train.sample(frac=1.0, random_state=3)
    assert patient_sets(partition(shuffled, k, scheme=scheme, seed=1, **kw)) == patient_sets(parts)


@pytest.mark.parametrize("scheme, kw", [s for s in SCHEME_KW if s[0] != "column"])
def test_another_seed_gives_another_split(train, scheme, kw):
    assert patient_sets(partition(train, 5, scheme, seed=1, **kw)) != \
        patient_sets(partition(train, 5, scheme, seed=2, **kw))


def test_iid_sizes_balanced_and_mix_close_to_pool(train):
    parts = partition(train, 7, "iid")
    sizes = [p["patient_id"].nunique() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(parts) < 0.15


def test_dirichlet_small_alpha_is_more_skewed(train):
    iid = np.mean([label_skew(partition(train, 5, "iid", seed=s)) for s in range(3)])
    skew = {a: np.mean([label_skew(partition(train, 5, "dirichlet", alpha=a, seed=s)) for s in range(3)])
            for a in (0.1, 100.0)}
    assert skew[0.1] > iid + 0.2
    assert skew[100.0] < skew[0.1] - 0.2


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_min_patients_is_honoured(train, scheme):
    for seed in range(5):
        parts = partition(train, 8, scheme, alpha=0.02, seed=seed, min_patients=20)
        assert_valid(parts, train, 8)
        assert min(p["patient_id"].nunique() for p in parts) >= 20


def test_quantity_sizes_unequal(train):
    sizes = sorted(p["patient_id"].nunique() for p in partition(train, 5, "quantity", alpha=0.5))
    assert sizes[-1] > 2 * sizes[0]


def majority_view(frame: pd.DataFrame) -> pd.Series:
    counts = pd.crosstab(frame["patient_id"], frame["view"])
    return counts.idxmax(axis=1)  # first maximum in sorted order: ties go to "AP"


def test_column_puts_each_view_on_its_own_client(train):
    parts = partition(train, 2, "column")
    majority = majority_view(train)
    assert [set(majority[p["patient_id"].unique()]) for p in parts] == [{"AP"}, {"PA"}]
    # Mixed-view patients travel whole: a client holds a few images of the other view.
    assert (parts[0]["view"] == "PA").any()


def test_column_tie_goes_to_first_value():
    frame = make_train(20)
    pid = 5  # one PA and one AP image: a tie, which goes to "AP", the first value in sorted order
    tie = frame.iloc[:2].assign(patient_id=pid, image=["t0.png", "t1.png"], view=["PA", "AP"])
    frame = pd.concat([frame, tie], ignore_index=True)
    parts = partition(frame, 2, "column")
    assert pid in set(parts[0]["patient_id"])


def test_column_more_clients_split_the_larger_site(train):
    majority = majority_view(train)
    parts = partition(train, 5, "column")
    assert_valid(parts, train, 5)
    views = [set(majority[p["patient_id"].unique()]) for p in parts]
    assert all(len(v) == 1 for v in views)
    n_ap, n_pa = (majority == "AP").sum(), (majority == "PA").sum()
    assert n_pa > n_ap
    # Extra clients go to the site with the most patients per client.
    assert views.count({"AP"}) == 2 and views.count({"PA"}) == 3


def test_column_fewer_clients_merge_whole_sites(train):
    frame = train.assign(site=train["patient_id"] % 3)
    parts = partition(frame, 2, "column", column="site")
    assert_valid(parts, frame, 2)
    sites = [set(p["site"]) for p in parts]
    assert sites[0].isdisjoint(sites[1]) and sites[0] | sites[1] == {0, 1, 2}
    assert partition(frame, 1, "column", column="site")[0]["patient_id"].nunique() == 400


def test_client_finding_table_and_label_skew_by_hand():
    rows = [("a.png", 1, "Atelectasis"), ("b.png", 1, "Atelectasis|Hernia"), ("c.png", 2, None),
            ("d.png", 3, None)]
    frame = pd.DataFrame({"image": [r[0] for r in rows], "patient_id": [r[1] for r in rows]})
    for name in LABELS:
        frame[name] = np.array([name in (r[2] or "").split("|") for r in rows], dtype=np.uint8)
    parts = [frame.iloc[:2], frame.iloc[2:]]
    table = client_finding_table(parts)
    assert list(table.columns) == ["images", "patients", *LABELS, NO_FINDING]
    shown = ["images", "patients", "Atelectasis", "Hernia", NO_FINDING]
    assert table.loc[0, shown].tolist() == [2, 1, 2, 1, 0]
    assert table.loc[1, shown].tolist() == [2, 2, 0, 0, 2]
    # Pooled mix: Atelectasis 2/5, Hernia 1/5, No Finding 2/5. Client 0 (2/3, 1/3, 0): TV 0.4;
    # client 1 (0, 0, 1): TV 0.6; both hold 2 images.
    assert label_skew(parts) == pytest.approx(0.5)
    assert label_skew([frame, frame]) == 0.0
    assert label_skew([frame, frame.iloc[:0]]) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "random"},
     "unknown partition scheme 'random'; choose one of iid, dirichlet, column, quantity"),
    ({"num_clients": 0}, "between 1 and the number of training patients (400), got 0"),
    ({"num_clients": 401}, "between 1 and the number of training patients (400), got 401"),
    ({"num_clients": 2.5}, "num_clients must be an integer, got 2.5"),
    ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
    ({"alpha": -1.0, "scheme": "dirichlet"}, "got -1.0"),
    ({"alpha": float("nan")}, "got nan"),
    ({"min_patients": 81}, "min_patients=81 is impossible for 5 clients and 400 patients"),
    ({"scheme": "column", "column": "hospital"}, "column 'hospital' is not in the table"),
    ({"column": "view"}, "column='view' is only used by scheme='column', not 'iid'"),
    ({"scheme": "column", "min_patients": 80}, "patient(s), fewer than min_patients=80"),
])
def test_errors_name_the_value(train, kwargs, message):
    kwargs = {"num_clients": 5, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        partition(train, **kwargs)


def test_errors_on_bad_tables(train):
    with pytest.raises(ValueError, match="no 'patient_id' column"):
        partition(train.drop(columns="patient_id"), 2)
    with pytest.raises(ValueError, match=re.escape("lacks finding column(s) ['Hernia']")):
        partition(train.drop(columns="Hernia"), 2, "dirichlet")
    with pytest.raises(ValueError, match="column 'view' has 1 missing value"):
        partition(train.assign(view=train["view"].where(train.index != 3)), 2, "column")


@pytest.mark.skipif(not (NIH_METADATA / "Data_Entry_2017.csv").is_file(),
                    reason=f"full NIH metadata not found at {NIH_METADATA}")
def test_full_scale_nih():
    meta = read_metadata(NIH_METADATA / "Data_Entry_2017.csv")
    train = split_by_patient(meta, NIH_METADATA)["train"]
    skew = {}
    for name, scheme, alpha in [("iid", "iid", 0.5), ("dir0.1", "dirichlet", 0.1),
                                ("dir1", "dirichlet", 1.0)]:
        parts = partition(train, 5, scheme, alpha=alpha, seed=0)
        sets = patient_sets(parts)
        assert sum(map(len, sets)) == len(set().union(*sets)) == train["patient_id"].nunique()
        assert sum(map(len, parts)) == len(train)
        skew[name] = label_skew(parts)
    assert skew["dir0.1"] > skew["iid"] + 0.1
    assert skew["dir0.1"] > skew["dir1"] > skew["iid"]
