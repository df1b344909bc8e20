"""Data stage: parsing, deterministic disjoint splits, exact schemas, sources, errors."""
import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fdpipe.stages import data
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import read_metadata

import tiny_assets

CFG = {
    "source": "embedded", "text_column": "text", "rating_column": "rating",
    "val_fraction": 0.1, "eval_fraction": 0.1, "prompt_words": 3, "pair_margin": 1.5,
    "pairs_train": 500, "pairs_val": 40, "max_prompts_train": 100, "max_prompts_eval": 16,
}

SCHEMAS = {
    "sft_train": {"id": "string", "text": "string", "rating": "double", "prompt": "string",
                  "completion": "string"},
    "prefs_train": {"pair_id": "int64", "chosen": "string", "rejected": "string",
                    "chosen_rating": "double", "rejected_rating": "double", "margin": "double"},
    "prompts_train": {"prompt_id": "string", "prompt": "string", "text": "string",
                      "rating": "double"},
}
SCHEMAS["sft_val"] = SCHEMAS["sft_train"]
SCHEMAS["prefs_val"] = SCHEMAS["prefs_train"]
SCHEMAS["prompts_eval"] = SCHEMAS["prompts_train"]


def outputs(folder):
    return {name: folder / f"{name}.parquet" for name in data.OUTPUTS}


def left_over(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return tiny_assets.build_fake_vader_sdist(tmp_path_factory.mktemp("res") / "vader.tar.gz")


@pytest.fixture(scope="module")
def embedded(sdist, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    tables = data.run(CFG, 0, sdist, outputs(out))
    return out, tables


def test_parse_ground_truth_crlf_and_entities():
    content = "1\t2.5\tA fine &amp; moving film.\r\n2\t-1.25\tDull.\r\n\r\n3\t0\tOkay\tish"
    with pytest.raises(DataError, match="line 4"):
        data.parse_ground_truth(content, "x.txt")
    df = data.parse_ground_truth(content.rsplit("\r\n", 1)[0], "x.txt")
    assert list(df["id"]) == ["1", "2"]
    assert list(df["text"]) == ["A fine & moving film.", "Dull."]
    assert list(df["rating"]) == [2.5, -1.25]
    with pytest.raises(DataError, match="line 1: rating 'good'"):
        data.parse_ground_truth("1\tgood\ttext", "x.txt")


def test_read_embedded_matches_the_sentences(sdist):
    df = data.read_embedded(sdist)
    expected = tiny_assets.rated_sentences(300)
    assert list(df["id"]) == list(expected["id"])
    assert list(df["text"]) == list(expected["text"])
    np.testing.assert_allclose(df["rating"], expected["rating"])


def test_schemas_and_provenance(embedded):
    out, _ = embedded
    assert left_over(out) == sorted(f"{n}.parquet" for n in data.OUTPUTS)
    for name, schema in SCHEMAS.items():
        table = pq.read_table(out / f"{name}.parquet")
        got = {f.name: str(f.type).replace("large_", "") for f in table.schema}
        assert got == schema, name
        meta = read_metadata(out / f"{name}.parquet")
        assert meta["seed"] == 0 and meta["config"] == CFG and meta["table"] == name


def test_splits_disjoint_and_tables_consistent(embedded):
    _, t = embedded
    train_ids, val_ids = set(t["sft_train"]["id"]), set(t["sft_val"]["id"])
    eval_ids = set(t["prompts_eval"]["prompt_id"])
    assert not train_ids & val_ids and not train_ids & eval_ids and not val_ids & eval_ids
    # 300 sentences: 30 val, 30 eval (16 prompts drawn), 240 train
    assert (len(train_ids), len(val_ids), len(eval_ids)) == (240, 30, 16)
    assert set(t["prompts_train"]["prompt_id"]) <= train_ids
    assert len(t["prompts_train"]) == 100
    train_texts, val_texts = set(t["sft_train"]["text"]), set(t["sft_val"]["text"])
    assert set(t["prefs_train"]["chosen"]) | set(t["prefs_train"]["rejected"]) <= train_texts
    assert set(t["prefs_val"]["chosen"]) | set(t["prefs_val"]["rejected"]) <= val_texts
    for sft in (t["sft_train"], t["sft_val"]):
        assert (sft["prompt"] + sft["completion"] == sft["text"]).all()
        assert sft["completion"].str.startswith(" ").all()
        assert (sft["prompt"].str.split().str.len() == 3).all()
    for prompts in (t["prompts_train"], t["prompts_eval"]):
        assert all(text.startswith(p + " ") for p, text in zip(prompts["prompt"], prompts["text"]))


def test_pairs_respect_margin_and_are_distinct(embedded):
    _, t = embedded
    for name, count in (("prefs_train", 500), ("prefs_val", 40)):
        pairs = t[name]
        assert len(pairs) == count
        assert list(pairs["pair_id"]) == list(range(count))
        assert (pairs["margin"] >= 1.5).all()
        np.testing.assert_allclose(pairs["margin"], pairs["chosen_rating"] - pairs["rejected_rating"])
        assert not pairs.duplicated(["chosen", "rejected"]).any()


def test_pairs_table_enumerates_every_qualifying_pair_once():
    df = pd.DataFrame({"text": [f"s{i}" for i in range(12)],
                       "rating": [0.0, 1.0, 1.0, 2.5, -1.0, 3.0, 0.5, 2.0, -2.0, 1.5, 0.0, 4.0]})
    brute = {(a, b) for a, b in itertools.permutations(range(12), 2)
             if df.rating[a] - df.rating[b] >= 1.5}
    pairs = data.pairs_table(df, 1.5, 10_000, np.random.default_rng(0), "x", "train")
    got = {(int(a[1:]), int(b[1:])) for a, b in zip(pairs["chosen"], pairs["rejected"])}
    assert len(pairs) == len(brute) and got == brute


def test_deterministic_and_seed_dependent(sdist, embedded, tmp_path):
    _, first = embedded
    again = data.run(CFG, 0, sdist, outputs(tmp_path / "a"))
    other = data.run(CFG, 1, sdist, outputs(tmp_path / "b"))
    for name in data.OUTPUTS:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert set(other["sft_val"]["id"]) != set(first["sft_val"]["id"])
    # the split does not depend on how many pairs are asked for
    fewer = data.run({**CFG, "pairs_train": 10}, 0, sdist, outputs(tmp_path / "c"))
    pd.testing.assert_frame_equal(fewer["sft_train"], first["sft_train"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "hf_disk", "hf_path"])
def test_alternative_sources_give_the_same_tables(fmt, embedded, tmp_path):
    _, expected = embedded
    df = tiny_assets.rated_sentences(300).rename(columns={"text": "sentence", "rating": "score"})
    cfg = {**CFG, "text_column": "sentence", "rating_column": "score"}
    if fmt == "csv":
        path = tmp_path / "r.csv"
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        path = tmp_path / "r.jsonl"
        df.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        path = tmp_path / "r.parquet"
        df.to_parquet(path)
    elif fmt == "hf_disk":
        import datasets
        path = f"hf:{tmp_path / 'saved'}"
        datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "saved"))
    else:  # a local folder that datasets.load_dataset reads (csv builder, offline)
        (tmp_path / "folder").mkdir()
        df.to_csv(tmp_path / "folder" / "train.csv", index=False)
        path = f"hf:{tmp_path / 'folder'}"
    cfg["source"] = str(path)
    source_path = None if str(path).startswith("hf:") else path
    tables = data.run(cfg, 0, source_path, outputs(tmp_path / "out"))
    for name in data.OUTPUTS:
        pd.testing.assert_frame_equal(tables[name], expected[name], check_dtype=False)


def _garbage(path):
    path.write_bytes(b"\x00\x01 not a table \xff")
    return path


@pytest.mark.parametrize("case", [
    "missing_file", "unreadable_parquet", "missing_column", "empty_csv", "too_few_rows",
    "non_numeric_rating", "no_pairs", "bad_suffix", "missing_sdist", "sdist_without_data",
    "hf_missing",
])
def test_errors_leave_no_outputs(case, tmp_path):
    cfg = dict(CFG)
    src = tmp_path / "src"
    src.mkdir()
    df = tiny_assets.rated_sentences(50)
    source_path = None
    if case == "missing_file":
        cfg["source"] = str(src / "nope.csv")
        match = "nope.csv: file not found"
    elif case == "unreadable_parquet":
        cfg["source"] = str(_garbage(src / "bad.parquet"))
        match = "bad.parquet: not a readable parquet"
    elif case == "missing_column":
        df.rename(columns={"rating": "stars"}).to_csv(src / "r.csv", index=False)
        cfg["source"] = str(src / "r.csv")
        match = "no column 'rating' .*data.rating_column"
    elif case == "empty_csv":
        (src / "r.csv").write_text("id,text,rating\n")
        cfg["source"] = str(src / "r.csv")
        match = "no usable rows"
    elif case == "too_few_rows":
        df.head(8).to_csv(src / "r.csv", index=False)
        cfg["source"] = str(src / "r.csv")
        match = "too few rows .*data.val_fraction"
    elif case == "non_numeric_rating":
        df.assign(rating="great").to_csv(src / "r.csv", index=False)
        cfg["source"] = str(src / "r.csv")
        match = "non-numeric"
    elif case == "no_pairs":
        df.assign(rating=1.0).to_csv(src / "r.csv", index=False)
        cfg["source"] = str(src / "r.csv")
        match = "data.pair_margin"
    elif case == "bad_suffix":
        df.to_csv(src / "r.tsv", index=False)
        cfg["source"] = str(src / "r.tsv")
        with pytest.raises(ConfigError, match="data.source"):
            data.run(cfg, 0, None, outputs(tmp_path / "out"))
        assert left_over(tmp_path / "out") == []
        return
    elif case == "missing_sdist":
        source_path = src / "vaderSentiment-3.3.2.tar.gz"
        match = "file not found .*fetch_resources"
    elif case == "sdist_without_data":
        source_path = _garbage(src / "vaderSentiment-3.3.2.tar.gz")
        match = "not a readable tar.gz"
    else:
        cfg["source"] = f"hf:{src / 'no_such_dataset'}"
        match = "hf:.*no_such_dataset: could not load"
    with pytest.raises(DataError, match=match):
        data.run(cfg, 0, source_path, outputs(tmp_path / "out"))
    assert left_over(tmp_path / "out") == []


@pytest.mark.parametrize("key,value", [("val_fraction", 0.7), ("prompt_words", 0),
                                       ("pair_margin", 0), ("pairs_train", "many"),
                                       ("text_column", None)])
def test_bad_config_names_the_key(key, value, sdist, tmp_path):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        data.run({**CFG, key: value}, 0, sdist, outputs(tmp_path / "out"))
    assert left_over(tmp_path / "out") == []


def test_failed_write_removes_written_outputs(sdist, tmp_path, monkeypatch):
    real = data.write_parquet
    calls = []

    def failing(df, path, meta):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(df, path, meta)

    monkeypatch.setattr(data, "write_parquet", failing)
    with pytest.raises(OSError):
        data.run(CFG, 0, sdist, outputs(tmp_path / "out"))
    assert left_over(tmp_path / "out") == []
