import logging
import re

import numpy as np
import pandas as pd
import pytest

from fedxray import Config
from fedxray.data import LABELS, NO_FINDING, read_metadata, split_by_patient
from fedxray.partition import (MAX_DRAWS, ZERO_POSITIVES, client_finding_table, hold_out_site_tests, label_skew, partition,
                               zero_positive_findings)
from fedxray.parts import client_partition


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


def sizes(parts):
    """Smallest client's patients and images."""
    return min(p["patient_id"].nunique() for p in parts), min(len(p) for p in parts)


@pytest.mark.parametrize("scheme, alpha", [("dirichlet", 0.1), ("quantity", 0.1)])
def test_minimum_client_size_is_honoured_by_redrawing(train, scheme, alpha):
    free = [sizes(partition(train, 8, scheme, alpha=alpha, seed=seed)) for seed in range(5)]
    assert min(p for p, _ in free) < 20 and min(i for _, i in free) < 40   # the minimum binds
    for seed in range(5):
        parts = partition(train, 8, scheme, alpha=alpha, seed=seed, min_client_patients=20,
                          min_client_images=40)
        assert_valid(parts, train, 8)
        patients, images = sizes(parts)
        assert patients >= 20 and images >= 40


def test_iid_is_the_seeded_round_robin_deal(train):
    """The default minimums never redraw iid: it stays the seed's first deal."""
    pids = np.unique(train["patient_id"])
    for seed, k in [(0, 5), (3, 7)]:
        owner = np.random.default_rng(seed).permutation(np.arange(len(pids)) % k)
        assert patient_sets(partition(train, k, "iid", seed=seed)) == \
            [set(pids[owner == c]) for c in range(k)]


def test_a_redrawn_split_is_fixed_by_the_seed(train, caplog):
    kw = dict(alpha=0.5, min_client_patients=55, min_client_images=150)   # seed 1: 4 draws refused
    with caplog.at_level(logging.INFO, logger="fedxray.partition"):
        parts = partition(train, 5, "dirichlet", seed=1, **kw)
    assert "dirichlet partition: 4 draw(s) refused" in caplog.text
    assert all(a.equals(b) for a, b in zip(parts, partition(train, 5, "dirichlet", seed=1, **kw)))
    shuffled = train.sample(frac=1.0, random_state=3)
    assert patient_sets(partition(shuffled, 5, "dirichlet", seed=1, **kw)) == patient_sets(parts)
    assert patient_sets(partition(train, 5, "dirichlet", seed=2, **kw)) != patient_sets(parts)
    # A minimum the first draw meets changes nothing.
    smallest = sizes(partition(train, 5, "dirichlet", seed=1, alpha=0.5))
    assert patient_sets(partition(train, 5, "dirichlet", seed=1, alpha=0.5, min_client_patients=smallest[0],
                                  min_client_images=smallest[1])) == \
        patient_sets(partition(train, 5, "dirichlet", seed=1, alpha=0.5))


@pytest.mark.parametrize("scheme, kw, message", [
    ("quantity", {"min_client_images": 190},
     r"quantity partition with alpha=0\.5 of 400 patients \(\d+ images\) into 5 clients: none of 100 draws "
     r"gave every client at least min_client_patients=1 patient\(s\) and min_client_images=190 image\(s\); in "
     r"the closest draw, client \d had \d+ patient\(s\) and \d+ image\(s\)\. Use a larger alpha, fewer "
     r"clients or a smaller minimum$"),
    ("dirichlet", {"min_client_patients": 75},
     r"dirichlet partition with alpha=0\.5 .* min_client_patients=75 .* Use a larger alpha, fewer clients "
     r"or a smaller minimum, or balanced_sizes=True$"),
    # One patient of 300 images: the four clients without them hold about 195 images each.
    ("iid", {"min_client_images": 250}, r"iid partition of 401 patients \(1273 images\) into 5 clients: "
     r"none of 100 draws .* Use fewer clients or a smaller minimum$"),
])
def test_an_unreachable_minimum_is_a_clear_error(train, scheme, kw, message):
    assert MAX_DRAWS == 100
    if scheme == "iid":
        train = pd.concat([train, train.iloc[:300].assign(patient_id=1, image=[f"{i}.png" for i in range(300)])])
    with pytest.raises(ValueError, match=message):
        partition(train, 5, scheme, alpha=0.5, **kw)


def test_a_column_site_under_the_minimum_is_an_error_naming_it(train):
    ap = train[majority_view(train).reindex(train["patient_id"]).to_numpy() == "AP"]
    with pytest.raises(ValueError, match=re.escape(
            f"the 'view' split leaves client 0 (view 'AP') with {ap['patient_id'].nunique()} patient(s) and "
            f"{len(ap)} image(s), fewer than min_client_patients=1 or min_client_images={len(ap) + 1}: use "
            f"fewer clients or a smaller minimum")):
        partition(train, 2, "column", min_client_images=len(ap) + 1)
    with pytest.raises(ValueError, match=r"client 2 \(view 'PA', one of its 3 clients\) with \d+ patient"):
        partition(train, 5, "column", min_client_patients=75)


def test_balanced_sizes_keep_patients_equal_and_labels_skewed(train):
    iid = np.mean([label_skew(partition(train, 5, "iid", seed=s)) for s in range(3)])
    for seed in range(3):
        parts = partition(train, 5, "dirichlet", alpha=0.1, seed=seed, balanced_sizes=True)
        assert_valid(parts, train, 5)
        patients = [p["patient_id"].nunique() for p in parts]
        assert max(patients) - min(patients) <= 1
        assert label_skew(parts) > iid + 0.2
    assert patient_sets(parts) == patient_sets(partition(train, 5, "dirichlet", alpha=0.1, seed=2,
                                                         balanced_sizes=True))


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
    assert list(table.columns) == ["images", "patients", *LABELS, NO_FINDING, ZERO_POSITIVES]
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
    ({"min_client_patients": 81}, "min_client_patients=81 is impossible for 5 clients and 400 patients: "
                                  "it must be between 0 and 80"),
    ({"min_client_patients": -1}, "min_client_patients=-1 is impossible"),
    ({"min_client_images": 10**6}, "min_client_images=1000000 is impossible for 5 clients and"),
    ({"min_client_images": 1.5}, "min_client_images must be an integer, got 1.5"),
    ({"balanced_sizes": True}, "balanced_sizes is only used by scheme='dirichlet', not 'iid'"),
    ({"balanced_sizes": "yes", "scheme": "dirichlet"}, "balanced_sizes must be True or False, got 'yes'"),
    ({"scheme": "column", "column": "hospital"}, "column 'hospital' is not in the table"),
    ({"column": "view"}, "column='view' is only used by scheme='column', not 'iid'"),
    ({"scheme": "column", "min_client_patients": 80}, "patient(s) and"),
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


@pytest.fixture(scope="module")
def nih_train(nih_metadata) -> pd.DataFrame:
    """The official split's training part of the full NIH metadata (78,146 images)."""
    return split_by_patient(read_metadata(nih_metadata / "Data_Entry_2017.csv"), nih_metadata)["train"]


def test_full_scale_nih(nih_train):
    train = nih_train
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


# Minimums above the smallest clients that dirichlet and quantity give at alpha 0.5 on NIH (5
# clients, seed 0: 1,124 patients / 5,295 images and 21 / 51; 20 clients: 401 / 1,348 and 3 / 8).
NIH_MINIMUM = {5: (1500, 6000), 20: (300, 1000)}


@pytest.mark.parametrize("k", sorted(NIH_MINIMUM))
@pytest.mark.parametrize("scheme, kw", [("iid", {}), ("dirichlet", {}), ("dirichlet", {"balanced_sizes": True}),
                                        ("quantity", {}), ("column", {})], ids=str)
def test_minimum_client_size_holds_at_nih_scale(nih_train, scheme, kw, k):
    min_patients, min_images = NIH_MINIMUM[k]
    alpha = {} if scheme in ("iid", "column") else {"alpha": 0.5}
    parts = partition(nih_train, k, scheme, seed=0, min_client_patients=min_patients,
                      min_client_images=min_images, **alpha, **kw)
    assert len(parts) == k and sum(map(len, parts)) == len(nih_train)
    patients, images = sizes(parts)
    assert patients >= min_patients and images >= min_images
    if scheme == "quantity":   # the minimum bound: without it the smallest client is far smaller
        free = partition(nih_train, k, scheme, seed=0, **alpha)
        assert min(len(p) for p in free) < min_images / 10


@pytest.mark.parametrize("k", [5, 20])
def test_balanced_sizes_at_nih_scale(nih_train, k):
    parts = partition(nih_train, k, "dirichlet", alpha=0.5, seed=0, balanced_sizes=True)
    patients = [p["patient_id"].nunique() for p in parts]
    assert max(patients) - min(patients) <= 1
    # Measured: 0.145 (5 clients) and 0.106 (20) against iid's 0.011 and 0.026; unbalanced
    # dirichlet: 0.128 and 0.131 with clients of 5,295 to 28,883 images at 5 clients.
    assert label_skew(parts) > label_skew(partition(nih_train, k, "iid", seed=0)) + 0.05


def tiny_table(rows) -> pd.DataFrame:
    """(image, patient, site, findings joined with "|" or None) -> a metadata-like table."""
    frame = pd.DataFrame({"image": [r[0] for r in rows], "patient_id": [r[1] for r in rows],
                          "site": [r[2] for r in rows]})
    for name in LABELS:
        frame[name] = np.array([name in (r[3] or "").split("|") for r in rows], dtype=np.uint8)
    return frame


def test_zero_positive_findings_are_reported_warned_and_counted(caplog):
    all_but_hernia = "|".join(LABELS[:-1])
    frame = tiny_table([("a.png", 1, "A", all_but_hernia), ("b.png", 2, "B", "Hernia|Effusion"),
                        ("c.png", 3, "B", None), ("d.png", 4, "C", all_but_hernia + "|Hernia")])
    parts = [frame.iloc[[0]], frame.iloc[[1, 2]], frame.iloc[[3]]]
    lacking = [name for name in LABELS if name not in ("Hernia", "Effusion")]
    assert zero_positive_findings(parts) == {0: ["Hernia"], 1: lacking}
    assert zero_positive_findings([frame]) == {}
    table = client_finding_table(parts)
    assert list(table.columns) == ["images", "patients", *LABELS, NO_FINDING, ZERO_POSITIVES]
    assert table[ZERO_POSITIVES].tolist() == [1, 12, 0]
    with caplog.at_level(logging.WARNING, logger="fedxray.partition"):
        again = partition(frame, 3, "column", column="site")
    assert [list(p["image"]) for p in again] == [["a.png"], ["b.png", "c.png"], ["d.png"]]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage() == ("column partition: 2 of 3 clients have no positive image of some finding "
                                   "(their local training never sees one): client 0: Hernia; "
                                   f"client 1: {', '.join(lacking)}")


@pytest.mark.parametrize("fields, message", [
    ({"min_client_patients": 100}, "min_client_patients=100 is impossible for 2 clients"),
    ({"min_client_images": 1000}, "min_client_images=1000 is impossible for 2 clients"),
    ({"balanced_sizes": True}, "balanced_sizes is only used by scheme='dirichlet', not 'iid'"),
])
def test_a_run_partitions_with_the_configs_minimums_and_balance(tiny_splits, fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        client_partition(Config(num_clients=2, **fields), tiny_splits)
    _, frames, _ = client_partition(Config(num_clients=2, partition="dirichlet", balanced_sizes=True,
                                           min_client_patients=2, min_client_images=4), tiny_splits)
    assert [f["patient_id"].nunique() >= 2 and len(f) >= 4 for f in frames] == [True, True]


# ----------------------------------------------------------------------------- site tests

def _mix(frame: pd.DataFrame) -> np.ndarray:
    counts = client_finding_table([frame]).loc[0, [*LABELS, NO_FINDING]].to_numpy(float)
    return counts / counts.sum()


@pytest.mark.parametrize("scheme, kw", [("iid", {}), ("dirichlet", {"alpha": 0.1}), ("column", {}),
                                        ("quantity", {"alpha": 0.5})])
def test_site_tests_are_whole_patients_of_their_own_site(scheme, kw):
    train = make_train(2000)
    parts = partition(train, 4, scheme=scheme, seed=0, **kw)
    kept, tests = hold_out_site_tests(parts, 0.2, seed=0)
    everyone = [*patient_sets(kept), *patient_sets(tests)]
    assert sum(len(s) for s in everyone) == len(set().union(*everyone)) == train["patient_id"].nunique()
    for k, (part, own, test) in enumerate(zip(parts, kept, tests)):
        assert set(own["image"]) | set(test["image"]) == set(part["image"]) and not set(own["image"]) & set(test["image"])
        n = part["patient_id"].nunique()
        assert abs(test["patient_id"].nunique() - 0.2 * n) <= 1, k   # systematic sampling: round(f n) or one off
    assert [len(t) for t in hold_out_site_tests(parts, 0.2, seed=0)[1]] == [len(t) for t in tests]   # seeded
    assert [set(t["image"]) for t in hold_out_site_tests(parts, 0.2, seed=1)[1]] != [set(t["image"]) for t in tests]


def test_under_label_skew_each_site_test_mirrors_its_own_site():
    """Dirichlet alpha 0.1: every site's test mix is closer to its own training mix than to any other
    site's, and close in absolute terms (total variation)."""
    train = make_train(3000)
    parts = partition(train, 5, scheme="dirichlet", alpha=0.1, seed=0, min_client_patients=100)
    kept, tests = hold_out_site_tests(parts, 0.2, seed=0)
    tv = np.array([[0.5 * np.abs(_mix(t) - _mix(own)).sum() for own in kept] for t in tests])
    assert label_skew(kept) > 0.3                                   # the sites really differ
    for k in range(5):
        others = np.delete(tv[k], k)
        assert tv[k, k] < 0.15 and tv[k, k] < 0.5 * others.min(), (k, tv.round(3))


def test_a_site_always_keeps_a_training_patient_and_says_when_it_has_no_test(caplog):
    train = make_train(40)
    first = train["patient_id"].iloc[0]
    one, rest = train[train["patient_id"] == first], train[train["patient_id"] != first]
    with caplog.at_level(logging.WARNING, logger="fedxray.partition"):
        kept, tests = hold_out_site_tests([rest, one], 0.99, seed=0)
    assert kept[0]["patient_id"].nunique() == 1 and kept[1].equals(one.reset_index(drop=True)) and len(tests[1]) == 0
    assert "client 0 holds 39 patient(s)" in caplog.text and "one is kept for training" in caplog.text
    assert "client 1 holds 1 patient(s): too few for a site test" in caplog.text
    with pytest.raises(ValueError, match="site_test_fraction must be a number in"):
        hold_out_site_tests([train], 1.0, seed=0)
    kept, tests = hold_out_site_tests([train], 0.0, seed=0)
    assert kept[0].equals(train) and len(tests[0]) == 0
