from __future__ import annotations

import pytest

from aurora_fx.data import load_bbc, load_csv, load_text_data, load_text_folder, load_tweets, minilm_path, split


def test_bbc_has_2225_articles_in_5_classes():
    bbc = load_bbc()
    assert len(bbc) == 2225
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")


def test_tweets_have_three_sentiments():
    tweets = load_tweets()
    assert len(tweets) > 38_000 and tweets.label_names == ("negative", "neutral", "positive")


def test_minilm_folder_ships_offline_weights():
    assert (minilm_path() / "model.safetensors").is_file()


def test_split_is_stratified_and_disjoint():
    bbc = load_bbc()
    rest, test = split(bbc, 400, seed=1)
    assert len(rest) + len(test) == len(bbc) and abs(len(test) - 400) <= 3
    assert not set(rest.texts) & set(test.texts) or len(set(bbc.texts)) < len(bbc)
    shares = [test.labels.count(y) / len(test) for y in range(5)]
    full = [bbc.labels.count(y) / len(bbc) for y in range(5)]
    assert max(abs(a - b) for a, b in zip(shares, full, strict=False)) < 0.01


def test_folder_and_csv_loaders(tmp_path):
    for label, text in [("pos", "good"), ("neg", "bad"), ("pos", "great")]:
        (tmp_path / "f" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / label / f"{text}.txt").write_text(text)
    data = load_text_folder(tmp_path / "f")
    assert data.label_names == ("neg", "pos") and sorted(data.labels) == [0, 1, 1]
    (tmp_path / "d.csv").write_text("text,label\nhello,a\nbye,b\n")
    assert load_text_data(tmp_path / "d.csv").label_names == ("a", "b")
    with pytest.raises(ValueError, match="needs columns 'text' and 'category'"):
        load_csv(tmp_path / "d.csv", label_column="category")
    with pytest.raises(ValueError, match="neither 'bbc'"):
        load_text_data(tmp_path / "missing.json")
