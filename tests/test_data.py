from __future__ import annotations

import pytest

from aurora_fx.data import (
    TextDataset,
    deduplicate,
    load_bbc,
    load_csv,
    load_text_data,
    load_text_folder,
    load_tweets,
    minilm_path,
    split,
    text_key,
)


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
    bbc, dropped = deduplicate(load_bbc())
    assert dropped == 101  # BBC News ships 98 exact duplicates, 3 more differ only in case or spacing
    rest, test = split(bbc, 400, seed=1)
    assert len(rest) + len(test) == len(bbc) and len(test) == 400
    assert not {text_key(t) for t in rest.texts} & {text_key(t) for t in test.texts}
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


@pytest.mark.parametrize("n_test", [1, 2, 3, 5, 7, 9])
def test_split_gives_exactly_the_count_asked_for(n_test):
    data = TextDataset(tuple(f"t{i}" for i in range(10)), (0, 1) * 5, ("a", "b"))
    rest, test = split(data, n_test, seed=0)
    assert len(test) == n_test and len(rest) == 10 - n_test
    assert abs(test.labels.count(0) - test.labels.count(1)) <= 1  # the remainder spread over the classes


def test_deduplicate_keeps_the_first_of_texts_equal_up_to_case_and_spaces():
    data = TextDataset(("Hello  world", "other", "hello world\n", "x"), (0, 1, 1, 0), ("a", "b"))
    kept, dropped = deduplicate(data)
    assert kept.texts == ("Hello  world", "other", "x") and kept.labels == (0, 1, 0) and dropped == 1
