"""Your own files (`--dataset PATH`): every format, column detection and mapping, times, categories, the
content-keyed cache, and each kind of bad input named with its file, column and an example row."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from own_data import bookshop, write_bookshop

from reclm_jax.cli import main
from reclm_jax.data import DataConfig, DataError, load_dataset
from reclm_jax.data.config import Columns


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLM_JAX_CACHE", str(tmp_path / "cache"))


def load(path, **kw):
    return load_dataset(DataConfig(name=str(path), cache=kw.pop("cache", False), **kw))


def histories(ds):
    """Each user's items as titles: comparable across catalogue orders."""
    return {u: [ds.titles[i] for i in s] for u, s in zip(ds.user_names, ds.sequences)}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


ITEMS_CSV = "item_id,title,genres\ni1,Alpha,Comedy|Drama\ni2,Beta,Drama\ni3,Gamma,Horror\ni4,Delta,Comedy\n"


def test_every_format_gives_the_same_dataset(tmp_path):
    rows, items = bookshop()
    expected_users = list(dict.fromkeys(r[0] for r in rows))
    datasets = {}
    for fmt in ("csv", "tsv", "parquet", "jsonl", "onetable", "atomic"):
        write_bookshop(tmp_path / fmt, fmt)
        datasets[fmt] = load(tmp_path / fmt)
    ref = datasets["csv"]
    assert ref.user_names == expected_users and ref.num_items == len(items) and ref.num_interactions == len(rows)
    assert ref.titles == [t for _, t, _ in items]  # catalogue order: the items file's
    assert [tuple(c) for _, _, c in items] == ref.item_categories
    # reader0's two same-hour items keep file order; all others are in time order, i.e. file order here
    assert histories(ref)["reader0"] == [dict((i, t) for i, t, _ in items)[r[1]] for r in rows if r[0] == "reader0"]
    for fmt, ds in datasets.items():
        assert histories(ds) == histories(ref), fmt
        assert dict(zip(ds.titles, ds.item_categories)) == dict(zip(ref.titles, ref.item_categories)), fmt


def test_columns_are_detected_by_common_names(tmp_path):
    write(tmp_path / "d" / "ratings.csv", "userId,movieId,rating,Time_Stamp\n" +
          "".join(f"u{u},i{i},4,{10 * u + i}\n" for u in (1, 2) for i in (1, 2, 3)))
    write(tmp_path / "d" / "movies.csv", "movieId,Name,Category\ni1,A,x\ni2,B,y\ni3,C,z\n")
    ds = load(tmp_path / "d")
    assert ds.user_names == ["u1", "u2"] and ds.titles == ["A", "B", "C"] and ds.categories == ["x", "y", "z"]


def test_unusual_column_names_need_a_short_mapping(tmp_path, capsys):
    d = tmp_path / "shop"
    write(d / "log.csv", "who,what,when\nann,i1,3\nann,i2,1\nann,i3,2\n")
    write(d / "catalogue.csv", "what,label,kinds\ni1,One,a\ni2,Two,b\ni3,Three,a\n")
    with pytest.raises(DataError, match=r"none of its tables has both a user and an item column .*log.csv: "
                       r"\['who', 'what', 'when'\]"):
        load(d)
    cols = Columns.parse("user=who, item=what,time=when,title=label,categories=kinds")
    ds = load(d, columns=cols)
    assert [ds.titles[i] for i in ds.sequences[0]] == ["Two", "Three", "One"]
    assert main(["data", "stats", "--dataset", str(d), "--columns", "user=who,item=what,time=when,title=label,"
                 "categories=kinds", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interactions"] == 3
    with pytest.raises(ValueError, match=r"--columns 'usr=who': expected ROLE=COLUMN with ROLE one of user"):
        Columns.parse("usr=who")
    with pytest.raises(DataError, match=r"log.csv: no column 'uid' \(data.columns.user\); its columns are "
                       r"\['who', 'what', 'when'\]"):
        load(d / "log.csv", meta=str(d / "catalogue.csv"), columns=Columns(user="uid", item="what"))
    # a configured name is never silently replaced by a detected one
    write(tmp_path / "e" / "log.csv", "user_id,item_id,timestamp\nann,i1,1\n")
    with pytest.raises(DataError, match=r"log.csv: no column 'customer' \(data.columns.user\)"):
        load(tmp_path / "e" / "log.csv", meta=str(d / "catalogue.csv"), columns=Columns(user="customer"))


def test_times_as_numbers_dates_and_offsets(tmp_path):
    items = write(tmp_path / "items.csv", ITEMS_CSV)
    # 10:00+02:00 is 08:00Z, so it comes first; a date alone is midnight UTC
    write(tmp_path / "a.csv", "user,item,time\nu,i1,2024-01-01T09:00:00Z\nu,i2,2024-01-01T10:00:00+02:00\n"
          "u,i3,2024-01-01\n")
    ds = load(tmp_path / "a.csv", meta=str(items))
    assert [ds.item_names[i] for i in ds.sequences[0]] == ["i3", "i2", "i1"]
    write(tmp_path / "b.csv", "user,item,time\nu,i1,2024-05-02 10:00:00\nu,i2,2024-05-01\nu,i3,2024-05-02\n")
    ds = load(tmp_path / "b.csv", meta=str(items))
    assert [ds.item_names[i] for i in ds.sequences[0]] == ["i2", "i3", "i1"]
    write(tmp_path / "c.csv", "user,item,time\nu,i1,1.5e9\nu,i2, 12\nu,i3,100\n")
    ds = load(tmp_path / "c.csv", meta=str(items))
    assert [ds.item_names[i] for i in ds.sequences[0]] == ["i2", "i3", "i1"]


def test_timestamp_columns_in_parquet(tmp_path):
    times = pa.array([3_000_000, 1_000_000, 2_000_000], pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"user_id": [7, 7, 7], "item_id": [1, 2, 3], "ts": times}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"item_id": ["1", "2", "3"], "title": ["A", "B", "C"],
                             "categories": [["x"], ["x", "y"], []]}), tmp_path / "items.parquet")
    ds = load(tmp_path)
    assert ds.user_names == ["7"] and [ds.titles[i] for i in ds.sequences[0]] == ["B", "C", "A"]
    assert ds.item_categories == [("x",), ("x", "y"), ()]
    assert any("1 items have no category in 'categories' (kept" in n and "row 3 (item '3')" in n for n in ds.notes)


def test_hierarchical_categories(tmp_path):
    write(tmp_path / "inter.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2\nu,c,3\n")
    write(tmp_path / "items.csv", "item_id,title,category\na,A,Books > Fiction > Mystery\nb,B,Books > Fiction\n"
          "c,C,Books > History\n")
    ds = load(tmp_path)
    assert ds.item_categories[0] == ("Books", "Books > Fiction", "Books > Fiction > Mystery")
    assert ds.categories == ["Books", "Books > Fiction", "Books > Fiction > Mystery", "Books > History"]
    # a list column holding one path per item (Amazon 2014 style, nested) and a flat list read as a path
    with open(tmp_path / "items.jsonl", "w") as f:
        f.write(json.dumps({"item_id": "a", "title": "A", "category": [["Books", "Fiction"]]}) + "\n")
        f.write(json.dumps({"item_id": "b", "title": "B", "category": [["Books", "History"], ["Gifts"]]}) + "\n")
        f.write(json.dumps({"item_id": "c", "title": "C", "category": [["Books"]]}) + "\n")
    ds = load(tmp_path / "inter.csv", meta=str(tmp_path / "items.jsonl"))
    assert ds.item_categories[1] == ("Books", "Books > History", "Gifts")
    ds = load(tmp_path / "inter.csv", meta=str(tmp_path / "items.csv"), category_sep=">", category_path=False)
    assert ds.item_categories[0] == ("Books", "Fiction", "Mystery")


def test_recbole_atomic_files_in_general(tmp_path):
    d = tmp_path / "yelp"
    write(d / "yelp.inter", "user_id:token\tbusiness_id:token\tstars:float\tdate:float\n"
          "u1\tb1\t5\t30\nu1\tb2\t4\t10\nu1\tb3\t3\t20\n")
    write(d / "yelp.item", "business_id:token\tname:token_seq\tcategories:token_seq\tcity:token\n"
          'b1\tJoe\'s "Best" Diner\tFood Diner\tX\nb2\tCafe Blue\tFood Cafe\tY\nb3\tGym\tFitness\tZ\n')
    ds = load(d)
    assert ds.titles == ['Joe\'s "Best" Diner', "Cafe Blue", "Gym"]  # quotes are text in atomic files
    assert [list(s) for s in ds.sequences] == [[1, 2, 0]] and ds.item_categories[0] == ("Food", "Diner")
    assert load(d / "yelp.inter").titles == ds.titles  # the .item next to a named .inter


def test_cache_is_keyed_by_content_not_mtime(tmp_path, capsys):
    write_bookshop(tmp_path / "shop", "csv")
    ds = load(tmp_path / "shop", cache=True)
    items = tmp_path / "shop" / "items.csv"
    stat = items.stat()
    text = items.read_text()
    edited = text.replace("The Amber Willow I", "The Amber Willow J")  # same size
    assert len(edited) == len(text) and edited != text
    items.write_text(edited)
    os.utime(items, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the bytes differ
    capsys.readouterr()
    again = load(tmp_path / "shop", cache=True)
    assert "building dataset" in capsys.readouterr().err
    assert again.titles[0] == "The Amber Willow J" and ds.titles[0] == "The Amber Willow I"
    load(tmp_path / "shop", cache=True)
    assert "building dataset" not in capsys.readouterr().err  # unchanged files: served from the cache


# ---- bad input: each is a one-line error or a counted note naming the file, the column and a row ----------

def test_missing_columns(tmp_path):
    write(tmp_path / "inter.csv", "user_id,item_id\nu,i1\n")
    write(tmp_path / "items.csv", ITEMS_CSV)
    with pytest.raises(DataError, match=r"inter.csv: no time column \(looked for timestamp, time, .*\); its columns "
                       r"are \['user_id', 'item_id'\]\. Name it with --columns time=COLUMN"):
        load(tmp_path)
    write(tmp_path / "inter.csv", "user_id,item_id,time\nu,i1,1\n")
    write(tmp_path / "items.csv", "item_id,title\ni1,A\n")
    with pytest.raises(DataError, match=r"items.csv: no categories column .*its columns are \['item_id', 'title'\]"):
        load(tmp_path)
    (tmp_path / "items.csv").unlink()
    with pytest.raises(DataError, match=r"inter.csv: no items table was found and this table has no title column"):
        load(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("inter.parquet", b"user_id,item_id,timestamp\nu,i,1\n", r"inter.parquet: not a Parquet file \(it starts with "
     r"b'user_id,item_id"),
    ("inter.csv", None, r"inter.csv: not a CSV file: it is a Parquet file; name it .parquet"),
    ("inter.csv", b"user_id\titem_id\ttimestamp\nu\ti\t1\n", r"inter.csv: not a CSV file: its header is "
     r"tab-separated; name it .tsv"),
    ("inter.jsonl", b'[{"user_id": "u"}]\n', r"inter.jsonl: not a JSON lines file: it is one JSON array"),
    ("inter.csv", b'{"user_id": "u", "item_id": "i1", "timestamp": 1}\n', r"inter.csv: not a CSV file: it looks "
     r"like JSON lines; name it .jsonl"),
    ("inter.parquet", b"<html><body>404</body></html>", r"inter.parquet: not a Parquet file \(it starts with b'<html>"),
    ("inter.csv", b"PK\x03\x04rest", r"inter.csv: not a CSV file: it is a zip archive"),
])
def test_a_file_that_is_not_what_its_extension_says(tmp_path, name, content, message):
    if content is None:
        pq.write_table(pa.table({"user_id": ["u"]}), tmp_path / name)
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load(tmp_path / name, meta=str(write(tmp_path / "items.csv", ITEMS_CSV)))


def test_mixed_id_types(tmp_path):
    with open(tmp_path / "inter.jsonl", "w") as f:
        for rec in ({"user_id": "a", "item_id": "i1", "timestamp": 1}, {"user_id": "a", "item_id": "i2", "timestamp": 2},
                    {"user_id": 17, "item_id": "i3", "timestamp": 3}):
            f.write(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"inter.jsonl: column 'user_id' mixes strings and numbers \(line 1: 'a'; "
                       r"line 3: 17\)"):
        load(tmp_path / "inter.jsonl", meta=str(write(tmp_path / "items.csv", ITEMS_CSV)))
    with open(tmp_path / "lists.jsonl", "w") as f:
        f.write(json.dumps({"user_id": ["a"], "item_id": "i1", "timestamp": 1}) + "\n")
    with pytest.raises(DataError, match=r"lists.jsonl: column 'user_id' holds list<item: string> values \(e.g. row 1: "
                       r"\['a'\]\), not ids"):
        load(tmp_path / "lists.jsonl", meta=str(tmp_path / "items.csv"))
    # ids typed differently in the two files still join when they spell the same (7 and "7")
    pq.write_table(pa.table({"user": [1, 1, 1, 1], "item": [7, 8, 9, 10], "time": [1, 2, 3, 4]}), tmp_path / "i.parquet")
    write(tmp_path / "m.csv", "item,title,genre\n007,Bond,Spy\n8,Eight,x\n9,Nine,y\n10,Ten,y\n")
    ds = load(tmp_path / "i.parquet", meta=str(tmp_path / "m.csv"))
    assert ds.titles == ["Eight", "Nine", "Ten"]  # '007' is not 7: counted with an example
    assert any("dropped 1 interactions whose item has no usable metadata, e.g. i.parquet row 1 (user '1', item '7')"
               in n for n in ds.notes)
    # ... and when nothing joins, the error shows both spellings
    write(tmp_path / "m.csv", "item,title,genre\n007,Bond,Spy\n008,Eight,x\n009,Nine,y\n")
    with pytest.raises(DataError, match=r"no interaction's item has usable metadata \(e.g. i.parquet row 1 \(user "
                       r"'1', item '7'\); catalogue ids look like \['007', '008', '009'\]\)"):
        load(tmp_path / "i.parquet", meta=str(tmp_path / "m.csv"))


def test_unparseable_and_empty_timestamps(tmp_path):
    items = str(write(tmp_path / "items.csv", ITEMS_CSV))
    write(tmp_path / "a.csv", "user,item,time\nu,i1,2024-01-01\nu,i2,yesterday\nu,i3,2024-01-03\n")
    with pytest.raises(DataError, match=r"a.csv: column 'time': 'yesterday' in row 2 is neither a number nor an ISO "
                       r"8601 date/time"):
        load(tmp_path / "a.csv", meta=items)
    write(tmp_path / "b.csv", "user,item,time\nu,i1,5\nu,i2,2024-01-01\nu,i3,7\n")
    with pytest.raises(DataError, match=r"b.csv: column 'time' mixes numbers and dates \(row 1: '5', row 2: "
                       r"'2024-01-01'\)"):
        load(tmp_path / "b.csv", meta=items)
    write(tmp_path / "c.csv", "user,item,time\nu,i1,5\nu,i2,\nu,i3,7\n")
    with pytest.raises(DataError, match=r"c.csv: column 'time' is empty in row 2"):
        load(tmp_path / "c.csv", meta=items)


def test_items_without_titles_and_empty_categories(tmp_path):
    write(tmp_path / "inter.csv", "user_id,item_id,timestamp\n" + "".join(f"u,{i},{k}\n" for k, i in
                                                                        enumerate(["i1", "i2", "i3", "i4"])))
    write(tmp_path / "items.csv", "item_id,title,genres\ni1,Alpha,Comedy\ni2,,Drama\ni3,Gamma,\ni4,Delta,Comedy\n")
    ds = load(tmp_path)
    assert ds.titles == ["Alpha", "Gamma", "Delta"] and ds.item_categories[1] == ()
    notes = " | ".join(ds.notes)
    assert "items.csv: 1 items have no title in 'title'; they and their interactions are left out, e.g. row 2 " \
           "(item 'i2')" in notes
    assert "items.csv: 1 items have no category in 'genres' (kept; they belong to no category), e.g. row 3 " \
           "(item 'i3')" in notes
    assert "dropped 1 interactions whose item has no usable metadata" in notes and "inter.csv row 2" in notes
    write(tmp_path / "items.csv", "item_id,title,genres\ni1,Alpha,\ni2,Beta,\ni3,Gamma,\ni4,Delta,\n")
    with pytest.raises(DataError, match=r"items.csv: column 'genres' is empty for every item \(e.g. row 1: item 'i1'\)"):
        load(tmp_path)
    write(tmp_path / "items.csv", "item_id,title,genres\ni1,,a\ni2, ,b\n")
    with pytest.raises(DataError, match=r"items.csv: no item has a title in column 'title' \(e.g. row 1\)"):
        load(tmp_path)


def test_short_users_duplicates_and_blank_ids_are_counted(tmp_path):
    write(tmp_path / "items.csv", ITEMS_CSV)
    write(tmp_path / "inter.csv", "user_id,item_id,timestamp\n"
          "a,i1,1\na,i2,2\na,i3,3\n"
          "a,i2,2\n"  # row 4: an exact duplicate of row 2
          "solo,i1,5\n"  # row 5: a user with one interaction
          ",i1,6\n"  # row 6: no user id
          "b,i4,1\nb,i3,2\nb,i2,3\n")
    ds = load(tmp_path)
    assert ds.user_names == ["a", "b"] and ds.num_interactions == 6
    notes = " | ".join(ds.notes)
    assert "inter.csv: dropped 1 rows without a user or item id, e.g. row 6 (user_id=None, item_id='i1')" in notes
    assert "dropped 1 repeated (user, item) interactions (kept the earliest), e.g. inter.csv row 4 (user 'a', item " \
           "'i2')" in notes
    assert "dropped 1 users with fewer than 3 interactions, e.g. inter.csv row 5 (user 'solo', item 'i1')" in notes


def test_min_rating_filter(tmp_path):
    write(tmp_path / "items.csv", ITEMS_CSV)
    write(tmp_path / "inter.csv", "user_id,item_id,rating,timestamp\nu,i1,5,1\nu,i2,1,2\nu,i3,4,3\nu,i4,4.5,4\n")
    ds = load(tmp_path, min_rating=4)
    assert [ds.item_names[i] for i in ds.sequences[0]] == ["i1", "i3", "i4"]
    assert any("inter.csv: dropped 1 rows with rating < 4 (data.min_rating)" in n for n in ds.notes)
    write(tmp_path / "inter.csv", "user_id,item_id,rating,timestamp\nu,i1,5,1\nu,i2,good,2\n")
    with pytest.raises(DataError, match=r"inter.csv: column 'rating': 'good' in row 2 is not a number"):
        load(tmp_path, min_rating=4)


def test_directory_errors(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset '.*nowhere': not one of ml-100k, ml-1m, amazon, steam, nor an"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no tables here"):
        load(tmp_path / "empty")
    write_bookshop(tmp_path / "two", "csv")
    write_bookshop(tmp_path / "two" / "x", "csv")
    (tmp_path / "two" / "x" / "interactions.csv").rename(tmp_path / "two" / "more.csv")
    with pytest.raises(DataError, match=r"several tables have both a user and an item column"):
        load(tmp_path / "two")
    assert load(tmp_path / "two" / "more.csv", meta=str(tmp_path / "two" / "items.csv")).num_users == 48


def test_truncated_tables(tmp_path):
    write_bookshop(tmp_path, "csv")
    data = gzip.compress((tmp_path / "interactions.csv").read_bytes())
    (tmp_path / "interactions.csv").unlink()
    (tmp_path / "interactions.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"interactions.csv.gz: "):
        load(tmp_path)
    (tmp_path / "interactions.csv.gz").write_bytes(data)
    assert load(tmp_path).num_users == 48
    write_bookshop(tmp_path / "pq", "parquet")
    data = (tmp_path / "pq" / "items.parquet").read_bytes()
    (tmp_path / "pq" / "items.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"items.parquet: "):
        load(tmp_path / "pq")


def test_cli_one_line_errors_on_bad_files(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inter.parquet").write_text("user,item,time\n")
    assert main(["data", "stats", "--dataset", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inter.parquet: not a Parquet file" in err


def test_data_section_of_a_config(tmp_path):
    """The `data:` section as YAML and as dotted overrides, as every stage's config reads it."""
    from reclm_jax import config

    d = tmp_path / "shop"
    write(d / "log.csv", "who,what,when\nann,i1,3\nann,i2,1\nann,i3,2\n")
    write(d / "catalogue.csv", "what,label,kinds\ni1,One,a;b\ni2,Two,b\ni3,Three,a\n")
    yaml_file = write(tmp_path / "data.yaml", f"name: {d}\ncolumns: {{user: who, item: what, time: when}}\n"
                      "category_sep: ';'\n")
    cfg = config.load(DataConfig, yaml_file, ["columns.title=label", "columns.categories=kinds", "cache=false"])
    assert cfg.columns == Columns(user="who", item="what", time="when", title="label", categories="kinds")
    ds = load_dataset(cfg)
    assert ds.item_categories[0] == ("a", "b") and ds.num_interactions == 3
    with pytest.raises(config.ConfigError, match=r"unknown config key 'columns.usr'"):
        config.load(DataConfig, None, ["columns.usr=who"])
