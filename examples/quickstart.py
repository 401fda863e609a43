"""30-second tour on a tiny BERT built from a config: sites → apply → inspect → train → save → export."""

import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import aurora_fx

model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=128, vocab_size=100, num_labels=3))
print(aurora_fx.sites(model, pattern="query|value"))
aurora_fx.apply(model, pattern="query|value", trainable_modules="classifier")
print(aurora_fx.inspect(model))

ids = torch.randint(1, 100, (8, 12))
labels = torch.randint(0, 3, (8,))
optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=1e-2)
for _step in range(10):
    loss = model(input_ids=ids, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"loss after 10 steps: {loss.item():.3f}")

out = Path(tempfile.mkdtemp())
aurora_fx.save_adapters(model, out)
result = aurora_fx.export.to_onnx(model, out / "model.onnx", example_kwargs={"input_ids": ids[:2]})
print(f"ONNX {result.path}: onnxruntime vs PyTorch {result.max_abs_diff}")
