"""Dataset loaders on small fixtures written in each raw format, bad input, and the real ML-100k."""

import gzip
import json

import numpy as np
import pytest

from reclm_jax import assets
from reclm_jax.cli import main
from reclm_jax.data import DataConfig, DataError, Dataset, load_dataset
from reclm_jax.data.amazon import category_prefixes
from reclm_jax.data.build import unique_titles


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Processed caches of fixture datasets go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("RECLM_JAX_CACHE", str(tmp_path / "cache"))


def write_ml100k(folder, inter_rows, item_rows):
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"{r}\n" for r in inter_rows)
    )
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "".join(f"{r}\n" for r in item_rows)
    )


def load_ml_fixture(folder, name="ml-100k", monkeypatch=None):
    monkeypatch.setattr(assets, "fetch", lambda n: folder)
    return load_dataset(DataConfig(name=name, cache=False))


ITEMS_100K = [
    "1\tToy Story\t1995\tAnimation Children's Comedy",
    "2\tGoldenEye\t1995\tAction Adventure Thriller",
    "3\tToy Story\t1995\tAnimation",  # a duplicate title, as ML-100k really has
    "4\tunkonwn\tunkonwn\tunknown",  # ML-100k's item 267
]


def test_movielens_100k_fixture(tmp_path, monkeypatch):
    inter = [
        "10\t2\t3\t200",
        "10\t1\t4\t100",
        "10\t3\t5\t200",  # ties with item 2: file order decides
        "11\t4\t5\t5",
        "11\t1\t5\t6",
        "11\t2\t5\t7",
        "12\t1\t5\t1",  # user 12 has two interactions only: dropped and counted
        "12\t2\t5\t2",
    ]
    write_ml100k(tmp_path, inter, ITEMS_100K)
    ds = load_ml_fixture(tmp_path, monkeypatch=monkeypatch)
    assert ds.titles == ["Toy Story (1995)", "GoldenEye (1995)", "Toy Story (1995) (2)", "unkonwn"]
    assert ds.user_names == ["10", "11"]
    assert [list(s) for s in ds.sequences] == [[0, 1, 2], [3, 0, 1]]
    assert ds.item_categories[0] == ("Animation", "Children's", "Comedy")
    assert ds.categories == sorted({"Animation", "Children's", "Comedy", "Action", "Adventure", "Thriller", "unknown"})
    assert any("fewer than 3 interactions" in n and "1 users" in n for n in ds.notes)
    assert ds.stats() == {"users": 2, "items": 4, "interactions": 6, "sparsity": 0.25, "categories": 7}
    hist, target = ds.test_example(0)
    assert list(hist) == [0, 1] and target == 2
    hist, target = ds.valid_example(1)
    assert list(hist) == [3] and target == 0
    assert list(ds.train_sequence(1)) == [3]
    assert ds.category_matrix[1, ds.category_index["Action"]] and not ds.category_matrix[0, ds.category_index["Action"]]


def test_movielens_1m_quirks(tmp_path, monkeypatch):
    """CRLF line ends, `1m_` user ids, the title-with-year as item id, a float year and a `genre` column."""
    item = "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
    item += "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n"
    item += "Heat (1995)\tHeat\t1995.0\tAction Crime Thriller\r\n"
    item += "Never Rated (1999)\tNever Rated\t1999\tDrama\r\n"
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
    inter += "1m_1\tHeat (1995)\t5\t978300760\r\n1m_1\tToy Story (1995)\t3\t978300761\r\n1m_1\tToy Story (1995)\t4\t978300762\r\n"
    inter += "1m_2\tToy Story (1995)\t5\t1\r\n1m_2\tHeat (1995)\t3\t2\r\n1m_2\tNever Rated (1999)\t3\t0\r\n"
    (tmp_path / "ml-1m.item").write_bytes(item.encode())
    (tmp_path / "ml-1m.inter").write_bytes(inter.encode())
    ds = load_ml_fixture(tmp_path, "ml-1m", monkeypatch)
    assert ds.titles == ["Toy Story (1995)", "Heat (1995)", "Never Rated (1999)"]
    assert ds.user_names == ["1m_2"]  # 1m_1 repeats Toy Story: 2 distinct items, dropped (counted)
    assert [list(s) for s in ds.sequences] == [[2, 0, 1]]
    assert ds.item_categories[1] == ("Action", "Crime", "Thriller")
    assert any("repeated" in n for n in ds.notes) and any("fewer than 3" in n for n in ds.notes)


def test_movielens_bad_input(tmp_path, monkeypatch):
    write_ml100k(tmp_path, ["10\t1\t3\tnot-a-time"], ITEMS_100K)
    with pytest.raises(DataError, match=r"ml-100k.inter: column 'timestamp': 'not-a-time' in row 1 is neither a number nor an ISO"):
        load_ml_fixture(tmp_path, monkeypatch=monkeypatch)
    write_ml100k(tmp_path, ["10\t1\t3"], ITEMS_100K)
    with pytest.raises(DataError, match=r"ml-100k.inter: CSV parse error: Expected 4 columns, got 3"):
        load_ml_fixture(tmp_path, monkeypatch=monkeypatch)
    (tmp_path / "ml-100k.item").write_text("item_id:token\ttitle:token_seq\n1\tX\n")
    with pytest.raises(DataError, match=r"ml-100k.item: missing column\(s\) \['movie_title', 'release_year', 'genre'\]"):
        load_ml_fixture(tmp_path, monkeypatch=monkeypatch)
    (tmp_path / "ml-100k.item").unlink()
    with pytest.raises(DataError, match=r"ml-100k.item: no such file"):
        load_ml_fixture(tmp_path, monkeypatch=monkeypatch)


def amazon_meta(asin, title, path):
    return {"asin": asin, "title": title, "category": path, "brand": "x"}


def review(user, asin, t):
    return {"overall": 5.0, "reviewerID": user, "asin": asin, "unixReviewTime": t, "reviewText": "ok"}


def write_lines(path, records, gz=False, literal=False):
    text = "".join((repr(r) if literal else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def test_category_prefixes():
    assert category_prefixes(["Movies & TV", "Genre for Featured Categories", "Drama"]) == (
        "Genre for Featured Categories",
        "Genre for Featured Categories, Drama",
    )
    assert category_prefixes(["Movies & TV"]) == ()


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_fixture_with_k_core(tmp_path, gz):
    meta = [
        amazon_meta("A", "Alien &amp; Co", ["Movies & TV", "Sci-Fi", "Space"]),
        amazon_meta("B", "Blade", ["Movies & TV", "Action"]),
        amazon_meta("C", "Casablanca", ["Movies & TV", "Drama"]),
        amazon_meta("D", "", ["Movies & TV", "Drama"]),  # no title: not an item
        amazon_meta("E", "Top level only", ["Movies & TV"]),  # no category below the top level
    ]
    reviews = []
    for u in ("u1", "u2", "u3"):
        reviews += [review(u, "C", 30), review(u, "A", 10), review(u, "B", 20), review(u, "D", 5)]
    reviews += [review("u4", "A", 1), review("u4", "B", 2)]  # u4 fails the 3-core
    reviews += [review("u1", "A", 40)]  # a repeat: the first (t=10) is kept
    suffix = ".gz" if gz else ""
    write_lines(tmp_path / f"meta.json{suffix}", meta, gz)
    write_lines(tmp_path / f"reviews.json{suffix}", reviews, gz)
    cfg = DataConfig("amazon", str(tmp_path / f"reviews.json{suffix}"), str(tmp_path / f"meta.json{suffix}"), 3, 3, cache=False)
    ds = load_dataset(cfg)
    assert ds.titles == ["Alien & Co", "Blade", "Casablanca"]
    assert ds.item_categories[0] == ("Sci-Fi", "Sci-Fi, Space")
    assert [list(s) for s in ds.sequences] == [[0, 1, 2]] * 3
    assert ds.user_names == ["u1", "u2", "u3"]
    notes = " | ".join(ds.notes)
    assert "2 metadata records lack a title" in notes and "3 interactions whose item has no usable metadata" in notes
    assert "3-core users / 3-core items" in notes and "kept 3 of 4 users" in notes


def test_amazon_bad_records(tmp_path):
    write_lines(tmp_path / "meta.json", [amazon_meta("A", "Alien", ["Movies & TV", "Sci-Fi"])])
    (tmp_path / "reviews.json").write_text(json.dumps(review("u", "A", 1)) + "\n{broken\n")
    cfg = DataConfig("amazon", str(tmp_path / "reviews.json"), str(tmp_path / "meta.json"), cache=False)
    with pytest.raises(DataError, match=r"reviews.json:2: not a JSON or Python-literal record"):
        load_dataset(cfg)
    write_lines(tmp_path / "reviews.json", [{"reviewerID": "u", "asin": "A"}])
    with pytest.raises(DataError, match=r"reviews.json:1: review record has no 'unixReviewTime' field"):
        load_dataset(cfg)


def test_steam_fixture(tmp_path):
    games = [
        {"id": "1", "app_name": "Portal", "title": "Portal", "genres": ["Action"], "tags": ["Puzzle", "Action"]},
        {"id": "2", "app_name": "Stardew Valley", "genres": ["Indie", "RPG"], "tags": ["Farming"]},
        {"id": "3", "title": "Doom", "genres": ["Action"]},
        {"app_name": "No id", "genres": ["Action"]},
    ]
    reviews = []
    for u in ("alice", "bob"):
        reviews += [
            {"username": u, "product_id": "3", "date": "2017-01-02", "text": "fun", "early_access": False},
            {"username": u, "product_id": "1", "date": "2017-01-01", "early_access": False},
            {"username": u, "product_id": "2", "date": "2017-01-02", "early_access": True},
        ]
    write_lines(tmp_path / "steam_games.json.gz", games, gz=True, literal=True)
    write_lines(tmp_path / "steam_reviews.json.gz", reviews, gz=True, literal=True)
    cfg = DataConfig("steam", str(tmp_path / "steam_reviews.json.gz"), str(tmp_path / "steam_games.json.gz"), 0, 0, cache=False)
    ds = load_dataset(cfg)
    assert ds.titles == ["Portal", "Stardew Valley", "Doom"]
    assert ds.item_categories[0] == ("Action", "Puzzle") and ds.item_categories[1] == ("Indie", "RPG", "Farming")
    # same-day reviews keep file order: Doom (3) before Stardew (2)
    assert [list(s) for s in ds.sequences] == [[0, 2, 1], [0, 2, 1]]
    assert any("1 game records lack" in n for n in ds.notes)


def test_steam_bad_date(tmp_path):
    write_lines(tmp_path / "g.json", [{"id": "1", "title": "Portal", "genres": ["Action"]}], literal=True)
    write_lines(tmp_path / "r.json", [{"username": "a", "product_id": "1", "date": "yesterday"}], literal=True)
    with pytest.raises(DataError, match=r"r.json:1: date 'yesterday' is not YYYY-MM-DD"):
        load_dataset(DataConfig("steam", str(tmp_path / "r.json"), str(tmp_path / "g.json"), cache=False))


def test_config_errors():
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="give --reviews and --meta"):
        DataConfig("amazon")
    with pytest.raises(ValueError, match="min_sequence must be >= 3"):
        DataConfig(min_sequence=2)


def test_unique_titles():
    titles, renamed = unique_titles(["A", "B", "A", "A (2)", "A"])
    assert titles == ["A", "B", "A (3)", "A (2)", "A (4)"] and renamed == 2
    assert len(set(titles)) == len(titles)


def test_save_load_roundtrip(tmp_path):
    ds = Dataset(
        name="t",
        titles=["a", "b", "c"],
        item_categories=[("x",), ("x", "y"), ()],
        sequences=[np.array([0, 1, 2], np.int32), np.array([2, 1, 0, 1], np.int32)],
        user_names=["u", "v"],
        item_names=["1", "2", "3"],
        notes=["n"],
    )
    ds.save(tmp_path / "d.npz")
    back = Dataset.load(tmp_path / "d.npz")
    assert back.titles == ds.titles and back.item_categories == ds.item_categories and back.notes == ds.notes
    assert [list(s) for s in back.sequences] == [list(s) for s in ds.sequences]


def test_cli_errors_are_one_line(capsys):
    assert main(["data", "stats", "--dataset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown dataset 'nope'" in err


@pytest.mark.network
def test_real_ml100k(monkeypatch, capsys):
    """The real ML-100k from the recbole wheel (fetched once into the user cache)."""
    monkeypatch.delenv("RECLM_JAX_CACHE", raising=False)
    assert main(["data", "stats", "--dataset", "ml-100k", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 943 and stats["items"] == 1682 and stats["interactions"] == 100_000
    assert stats["categories"] == 19 and abs(stats["sparsity"] - (1 - 100_000 / (943 * 1682))) < 1e-12
    ds = load_dataset("ml-100k")
    assert len(set(ds.titles)) == 1682 and ds.titles[0] == "Toy Story (1995)"
    assert all(len(s) >= 20 for s in ds.sequences)


def test_amazon_category_not_a_list(tmp_path):
    """A dict or a number where the category path should be is counted, not a raw KeyError/TypeError."""
    meta = [amazon_meta("A", "Alien", ["Movies & TV", "Sci-Fi"]), amazon_meta("B", "Blade", {"0": "Action"}),
            amazon_meta("C", "Casablanca", 7), amazon_meta("D", "Dune", ["Movies & TV", "Sci-Fi"]),
            amazon_meta("E", "Ed Wood", ["Movies & TV", "Drama"])]
    write_lines(tmp_path / "meta.json", meta)
    write_lines(tmp_path / "reviews.json", [review("u", a, t) for t, a in enumerate("ABCDE")])
    ds = load_dataset(DataConfig("amazon", str(tmp_path / "reviews.json"), str(tmp_path / "meta.json"), 0, 0, cache=False))
    assert ds.titles == ["Alien", "Dune", "Ed Wood"]
    notes = " | ".join(ds.notes)
    assert "2 metadata records lack a title or a category" in notes
    assert "meta.json: some 'category' values are not a list (e.g. line 2: {'0': 'Action'})" in notes


@pytest.mark.parametrize("records", [[], [{"asin": "A", "brand": "x"}, {"asin": "B", "title": "Blade"}]])
def test_amazon_no_usable_metadata(tmp_path, records):
    write_lines(tmp_path / "meta.json", records)
    write_lines(tmp_path / "reviews.json", [review("u", "A", 1)])
    cfg = DataConfig("amazon", str(tmp_path / "reviews.json"), str(tmp_path / "meta.json"), cache=False)
    with pytest.raises(DataError, match=rf"meta.json: no usable metadata records \({len(records)} read; each needs "
                       "an 'asin', a 'title' and a 'category' list"):
        load_dataset(cfg)


def test_steam_genres_and_tags_as_strings(tmp_path):
    games = [{"id": "1", "title": "Portal", "genres": "Action, Puzzle", "tags": "Sci-fi"},
             {"id": "2", "title": "Doom", "genres": ["Action"], "tags": 5},
             {"id": "3", "title": "Myst", "genres": "", "tags": ["Puzzle"]}]
    write_lines(tmp_path / "g.json", games, literal=True)
    write_lines(tmp_path / "r.json", [{"username": "a", "product_id": i, "date": "2017-01-0" + i} for i in "123"],
                literal=True)
    ds = load_dataset(DataConfig("steam", str(tmp_path / "r.json"), str(tmp_path / "g.json"), 0, 0, min_sequence=3,
                                 cache=False))
    assert ds.item_categories == [("Action", "Puzzle", "Sci-fi"), ("Action",), ("Puzzle",)]
    write_lines(tmp_path / "g.json", [{"id": "1", "title": "Portal"}], literal=True)
    with pytest.raises(DataError, match=r"g.json: no usable metadata records \(1 read"):
        load_dataset(DataConfig("steam", str(tmp_path / "r.json"), str(tmp_path / "g.json"), cache=False))


def test_truncated_json_gz(tmp_path):
    write_lines(tmp_path / "meta.json.gz", [amazon_meta(f"A{i}", f"T{i}", ["M", "X"]) for i in range(2000)], gz=True)
    data = (tmp_path / "meta.json.gz").read_bytes()
    (tmp_path / "meta.json.gz").write_bytes(data[: len(data) // 2])
    write_lines(tmp_path / "reviews.json", [review("u", "A1", 1)])
    cfg = DataConfig("amazon", str(tmp_path / "reviews.json"), str(tmp_path / "meta.json.gz"), cache=False)
    with pytest.raises(DataError, match=r"meta.json.gz: the gzip data is cut short or corrupt after line \d+ .*"
                       "download the file again"):
        load_dataset(cfg)
