"""Data stage: rated sentences -> SFT examples, preference pairs and prompts.

A source yields sentences with a human rating (higher = more positive). Every source goes
through the same path: load -> clean -> seeded split into train / val / eval -> build the
six tables -> check them -> write them. Nothing is written until every table is built, so
a bad source or config leaves no output behind.

Sources (config key ``data.source``):

- ``embedded``: ``movieReviewSnippets_GroundTruth.txt`` (``id<TAB>mean_rating<TAB>text``,
  UTF-8, CRLF) read from ``additional_resources/hutto_ICWSM_2014.tar.gz`` inside the
  ``vaderSentiment`` source distribution fetched by the resources stage;
- a local ``.parquet``, ``.jsonl`` or ``.csv`` file with columns ``data.text_column`` and
  ``data.rating_column`` (and ``id`` if present);
- ``hf:<name>``: a `datasets` dataset, either a folder written by ``save_to_disk`` or any
  name or path ``datasets.load_dataset`` resolves (offline: a local one). Its ``train`` split
  is used when it has several.
"""
from __future__ import annotations

import html
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import provenance, write_parquet

log = logging.getLogger("fdpipe.data")

OUTPUTS = ("sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_train", "prompts_eval")
NESTED_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
EMBEDDED_FILE = "movieReviewSnippets_GroundTruth.txt"
FILE_SUFFIXES = (".parquet", ".jsonl", ".csv")

# Independent random streams, so that e.g. changing pairs_train leaves the split alone.
_STREAM_SPLIT, _STREAM_PAIRS_TRAIN, _STREAM_PAIRS_VAL, _STREAM_PROMPTS_TRAIN, \
    _STREAM_PROMPTS_EVAL = range(5)


# ---------------------------------------------------------------------------- config

def check_config(data_cfg: dict) -> None:
    """Raise ConfigError naming the first `data.*` key that is missing or out of range."""
    def need(key, ok, expected):
        value = data_cfg.get(key)
        if value is None or not ok(value):
            raise ConfigError(f"data.{key}", expected, value)

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    need("source", lambda v: isinstance(v, str) and v.strip(), "a non-empty string")
    need("text_column", lambda v: isinstance(v, str) and v, "a column name")
    need("rating_column", lambda v: isinstance(v, str) and v, "a column name")
    need("val_fraction", lambda v: is_num(v) and 0 < v < 0.5, "a number in (0, 0.5)")
    need("eval_fraction", lambda v: is_num(v) and 0 < v < 0.5, "a number in (0, 0.5)")
    need("prompt_words", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("pair_margin", lambda v: is_num(v) and v > 0, "a number > 0")
    for key in ("pairs_train", "pairs_val", "max_prompts_train", "max_prompts_eval"):
        need(key, lambda v: is_int(v) and v >= 1, "an integer >= 1")


# ---------------------------------------------------------------------------- sources

def read_embedded(sdist_path) -> pd.DataFrame:
    """Rated movie-review sentences from the vaderSentiment sdist: columns id, text, rating."""
    sdist_path = Path(sdist_path)
    if not sdist_path.exists():
        raise DataError(sdist_path, "file not found (it is fetched by rule fetch_resources)")
    try:
        with tarfile.open(sdist_path, "r:*") as outer:
            nested = _find_member(outer, NESTED_ARCHIVE, sdist_path)
            nested_bytes = outer.extractfile(nested).read()
        with tarfile.open(fileobj=io.BytesIO(nested_bytes), mode="r:*") as inner:
            member = _find_member(inner, EMBEDDED_FILE, sdist_path)
            raw = inner.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(sdist_path, f"not a readable tar.gz archive ({exc})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(sdist_path, f"{EMBEDDED_FILE} is not UTF-8 ({exc})") from None
    return parse_ground_truth(content, f"{sdist_path}:{EMBEDDED_FILE}")


def _find_member(archive: tarfile.TarFile, suffix: str, path) -> tarfile.TarInfo:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return member
    raise DataError(path, f"archive has no member ending in {suffix}")


def parse_ground_truth(content: str, where: str) -> pd.DataFrame:
    """Parse ``id<TAB>mean_rating<TAB>text`` lines (any line ending) into id, text, rating.

    HTML entities in the text (``&amp;``) are unescaped. A malformed line raises DataError
    naming `where` and the line number.
    """
    ids, texts, ratings = [], [], []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(where, f"line {lineno}: expected id<TAB>rating<TAB>text, "
                                   f"got {len(parts)} field(s)")
        try:
            rating = float(parts[1])
        except ValueError:
            raise DataError(where, f"line {lineno}: rating {parts[1]!r} is not a number") from None
        ids.append(parts[0].strip())
        texts.append(html.unescape(parts[2]))
        ratings.append(rating)
    return pd.DataFrame({"id": ids, "text": texts, "rating": ratings})


def read_table(path, text_column: str, rating_column: str) -> pd.DataFrame:
    """A local .parquet / .jsonl / .csv file -> columns id, text, rating."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found (config key data.source)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".jsonl":
            df = pd.read_json(path, lines=True)
        elif suffix == ".csv":
            df = pd.read_csv(path)
        else:
            raise DataError(path, f"unsupported file type {suffix!r}; expected one of "
                                  f"{', '.join(FILE_SUFFIXES)} (config key data.source)")
    except DataError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        raise DataError(path, f"not a readable {suffix[1:]} file "
                              f"({type(exc).__name__}: {exc})") from None
    return _select_columns(df, path, text_column, rating_column)


def read_hf(name: str, text_column: str, rating_column: str) -> pd.DataFrame:
    """A `datasets` dataset (a save_to_disk folder, or a name/path load_dataset resolves)."""
    import datasets

    where = f"hf:{name}"
    try:
        if Path(name).is_dir() and _is_saved_dataset(Path(name)):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many types (offline, not found, bad format)
        raise DataError(where, f"could not load the dataset ({type(exc).__name__}: {exc}) "
                               f"(config key data.source)") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(where, f"has splits {sorted(ds)} and none is named 'train'")
    return _select_columns(ds.to_pandas(), where, text_column, rating_column)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()


def _select_columns(df: pd.DataFrame, where, text_column: str, rating_column: str) -> pd.DataFrame:
    for key, column in (("data.text_column", text_column), ("data.rating_column", rating_column)):
        if column not in df.columns:
            raise DataError(where, f"no column {column!r} (config key {key}); "
                                   f"columns are {list(df.columns)}")
    ratings = pd.to_numeric(df[rating_column], errors="coerce")
    bad = ratings.isna() & df[rating_column].notna()
    if bad.any():
        first = df[rating_column][bad].iloc[0]
        raise DataError(where, f"column {rating_column!r} has non-numeric values "
                               f"(e.g. {first!r}; config key data.rating_column)")
    ids = df["id"].astype(str) if "id" in df.columns else pd.Series(np.arange(len(df))).astype(str)
    return pd.DataFrame({"id": ids.to_numpy(), "text": df[text_column].to_numpy(),
                         "rating": ratings.to_numpy()})


def load_source(data_cfg: dict, source_path=None) -> tuple[pd.DataFrame, str]:
    """Load `data.source`; return the raw id/text/rating frame and a name for messages.

    `source_path` is the file to read for ``embedded`` (the vaderSentiment sdist) and for
    a local file source (defaults to ``data.source`` itself); it is unused for ``hf:``.
    """
    source = data_cfg["source"].strip()
    if source == "embedded":
        if source_path is None:
            raise ConfigError("data.source", "the path of the vaderSentiment sdist for "
                                             "'embedded'", None)
        return read_embedded(source_path), str(source_path)
    if source.startswith("hf:"):
        name = source[3:].strip()
        if not name:
            raise ConfigError("data.source", "hf:<dataset name or path>", source)
        return read_hf(name, data_cfg["text_column"], data_cfg["rating_column"]), source
    if Path(source).suffix.lower() in FILE_SUFFIXES:
        path = source_path if source_path is not None else source
        return read_table(path, data_cfg["text_column"], data_cfg["rating_column"]), str(path)
    raise ConfigError("data.source", "'embedded', a .parquet/.jsonl/.csv path or hf:<name>",
                      source)


# ---------------------------------------------------------------------------- cleaning / split

def clean(df: pd.DataFrame, prompt_words: int, where) -> pd.DataFrame:
    """Normalise whitespace, drop rows without text or rating, with too few words for a
    prompt plus a completion, or whose text repeats an earlier row."""
    n0 = len(df)
    df = df.dropna(subset=["text", "rating"])
    df = df.assign(text=df["text"].astype(str).map(lambda t: " ".join(t.split())))
    df = df[df["text"].str.split().str.len() > prompt_words]
    df = df.drop_duplicates(subset="text", keep="first")
    df = df.drop_duplicates(subset="id", keep="first")
    df = df.reset_index(drop=True).astype({"id": str, "text": str, "rating": "float64"})
    if len(df) == 0:
        raise DataError(where, f"no usable rows (of {n0}): every row lacks text or rating or "
                               f"has at most data.prompt_words={prompt_words} words")
    log.info("%s: %d usable sentences of %d rows", where, len(df), n0)
    return df


def split(df: pd.DataFrame, val_fraction: float, eval_fraction: float, seed: int, where):
    """Seeded disjoint split of the rows into train / val / eval frames."""
    n = len(df)
    n_val = int(round(n * val_fraction))
    n_eval = int(round(n * eval_fraction))
    n_train = n - n_val - n_eval
    if n_val < 2 or n_eval < 1 or n_train < 2:
        raise DataError(where, f"too few rows ({n}) for the splits: data.val_fraction="
                               f"{val_fraction} and data.eval_fraction={eval_fraction} give "
                               f"{n_train} train / {n_val} val / {n_eval} eval; need at least "
                               f"2 / 2 / 1")
    order = np.random.default_rng([seed, _STREAM_SPLIT]).permutation(n)
    train = df.iloc[np.sort(order[:n_train])].reset_index(drop=True)
    val = df.iloc[np.sort(order[n_train:n_train + n_val])].reset_index(drop=True)
    evaluation = df.iloc[np.sort(order[n_train + n_val:])].reset_index(drop=True)
    return train, val, evaluation


# ---------------------------------------------------------------------------- tables

def split_words(text: str, prompt_words: int) -> tuple[str, str]:
    """(first `prompt_words` words, the rest with its leading space); text is normalised."""
    words = text.split(" ")
    return " ".join(words[:prompt_words]), " " + " ".join(words[prompt_words:])


def sft_table(df: pd.DataFrame, prompt_words: int) -> pd.DataFrame:
    parts = [split_words(t, prompt_words) for t in df["text"]]
    return pd.DataFrame({
        "id": df["id"].astype(str).to_numpy(),
        "text": df["text"].to_numpy(),
        "rating": df["rating"].astype("float64").to_numpy(),
        "prompt": [p for p, _ in parts],
        "completion": [c for _, c in parts],
    })


def prompts_table(df: pd.DataFrame, prompt_words: int, limit: int, rng) -> pd.DataFrame:
    n = min(limit, len(df))
    rows = df.iloc[np.sort(rng.choice(len(df), size=n, replace=False))]
    return pd.DataFrame({
        "prompt_id": rows["id"].astype(str).to_numpy(),
        "prompt": [split_words(t, prompt_words)[0] for t in rows["text"]],
        "text": rows["text"].to_numpy(),
        "rating": rows["rating"].astype("float64").to_numpy(),
    })


def pairs_table(df: pd.DataFrame, margin: float, count: int, rng, where, split_name: str):
    """Up to `count` distinct pairs of sentences whose ratings differ by at least `margin`.

    Pairs are drawn uniformly without replacement from all qualifying unordered pairs:
    with the sentences sorted by rating, sentence p (the chosen one) can be paired with
    any of the `c_p` lowest-rated sentences whose rating is at most ``r_p - margin``, so
    the qualifying pairs are numbered 0..sum(c_p)-1 and a sample of those numbers maps
    back to (chosen, rejected) without listing every pair.
    """
    ratings = df["rating"].to_numpy(dtype=np.float64)
    order = np.argsort(ratings, kind="stable")
    sorted_r = ratings[order]
    partners = np.searchsorted(sorted_r, sorted_r - margin, side="right")
    total = int(partners.sum())
    if total == 0:
        raise DataError(where, f"the {split_name} split has no two sentences whose ratings "
                               f"differ by data.pair_margin={margin} or more")
    if total < count:
        log.warning("%s split: only %d qualifying pairs, fewer than the %d asked for",
                    split_name, total, count)
    n = min(count, total)
    picks = rng.choice(total, size=n, replace=False)
    ends = np.cumsum(partners)
    chosen_pos = np.searchsorted(ends, picks, side="right")
    rejected_pos = picks - (ends[chosen_pos] - partners[chosen_pos])
    chosen, rejected = order[chosen_pos], order[rejected_pos]
    chosen_r, rejected_r = ratings[chosen], ratings[rejected]
    return pd.DataFrame({
        "pair_id": np.arange(n, dtype=np.int64),
        "chosen": df["text"].to_numpy()[chosen],
        "rejected": df["text"].to_numpy()[rejected],
        "chosen_rating": chosen_r,
        "rejected_rating": rejected_r,
        "margin": chosen_r - rejected_r,
    })


def build_tables(df: pd.DataFrame, data_cfg: dict, seed: int, where) -> dict[str, pd.DataFrame]:
    """Everything the stage writes, built in memory from the raw frame."""
    k = data_cfg["prompt_words"]
    df = clean(df, k, where)
    train, val, evaluation = split(df, data_cfg["val_fraction"], data_cfg["eval_fraction"],
                                   seed, where)
    margin = float(data_cfg["pair_margin"])
    return {
        "sft_train": sft_table(train, k),
        "sft_val": sft_table(val, k),
        "prefs_train": pairs_table(train, margin, data_cfg["pairs_train"],
                                   np.random.default_rng([seed, _STREAM_PAIRS_TRAIN]), where,
                                   "train"),
        "prefs_val": pairs_table(val, margin, data_cfg["pairs_val"],
                                 np.random.default_rng([seed, _STREAM_PAIRS_VAL]), where, "val"),
        "prompts_train": prompts_table(train, k, data_cfg["max_prompts_train"],
                                       np.random.default_rng([seed, _STREAM_PROMPTS_TRAIN])),
        "prompts_eval": prompts_table(evaluation, k, data_cfg["max_prompts_eval"],
                                      np.random.default_rng([seed, _STREAM_PROMPTS_EVAL])),
    }


# ---------------------------------------------------------------------------- stage

def run(data_cfg: dict, seed: int, source_path, outputs: dict) -> dict[str, pd.DataFrame]:
    """Build the six data tables and write them to `outputs` (name -> path).

    `outputs` must name every table in `OUTPUTS`. Validation happens in full before the
    first file is written; if writing fails part way, the files already written are
    removed again, so the stage leaves either all outputs or none.
    """
    check_config(data_cfg)
    missing = [name for name in OUTPUTS if name not in outputs]
    if missing:
        raise ConfigError("outputs", f"a path for each of {list(OUTPUTS)}", f"missing {missing}")
    raw, where = load_source(data_cfg, source_path)
    tables = build_tables(raw, data_cfg, seed, where)
    meta = provenance(data_cfg, seed, stage="data", source=where)
    written = []
    try:
        for name in OUTPUTS:
            write_parquet(tables[name], outputs[name], {**meta, "table": name})
            written.append(Path(outputs[name]))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for name in OUTPUTS:
        log.info("wrote %s: %d rows -> %s", name, len(tables[name]), outputs[name])
    return tables
