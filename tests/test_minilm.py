"""Real pretrained weights (all-MiniLM-L6-v2, offline package) and real text (BBC News)."""

from __future__ import annotations

import pytest
import torch

import aurora_fx
from aurora_fx.data import load_bbc, split
from aurora_fx.train import TrainConfig, encode, evaluate, train_classifier
from aurora_fx.zoo import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bbc_small():
    train, test = split(load_bbc(), 120, seed=0)
    return train, test


def test_minilm_sentence_embeddings_match_the_published_sanity_values():
    loaded = load_model("minilm")
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    enc = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (emb[0] @ emb[1]).item() == pytest.approx(0.755, abs=0.01)
    assert (emb[0] @ emb[2]).item() < 0.2


def test_aurora_on_minilm_learns_bbc_and_keeps_the_base(bbc_small):
    train, test = bbc_small
    torch.manual_seed(0)
    loaded = load_model("minilm", num_labels=5)
    model = loaded.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier")}
    tr, te = encode(loaded.tokenizer, train, 64), encode(loaded.tokenizer, test, 64)
    before = evaluate(model, te, progress=False)
    aurora_fx.apply(model, "query|value", trainable_modules="classifier")
    assert sum(a.num_params for a in aurora_fx.adapters(model)) == 18_672  # docs/methods.md §2.5, MiniLM-L6 q,v
    result = train_classifier(model, tr, TrainConfig(steps=25, lr=5e-3, max_length=64), progress=False)
    after = evaluate(model, te, progress=False)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert after > before + 0.2, (before, after)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
