"""The cross-encoder ranker: a BERT-family model reading (player question, KB question) together.

It starts from the MiniLM weights and is trained by ``qa-app train-ranker``; its single output logit says
how likely the KB question asks the same thing as the player. The shipped weights are fp16; on CPU they
are run in fp32 (CPU half-precision GEMMs are slow) or with dynamic INT8 Linear layers, on CUDA in fp16.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from qa_app.models.loading import pick_device, quantize_for_cpu, resolve_model

DEFAULT_RANKER = "ranker"


class Ranker:
    def __init__(self, model: str = DEFAULT_RANKER, device: str = "auto", max_length: int = 64,
                 cpu_int8: bool = False) -> None:
        source = resolve_model(model)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = BertForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
        self.model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model.half()
        self.quantized = self.device.type == "cpu" and cpu_int8
        if self.quantized:
            self.model = quantize_for_cpu(self.model)
        self.max_length = max_length
        self.source = source

    @torch.inference_mode()
    def score(self, queries: list[str], passages: list[str], batch_size: int = 64) -> np.ndarray:
        """One logit per (query, passage) pair, float32 [len(queries)]."""
        if len(queries) != len(passages):
            raise ValueError("queries and passages must pair up one to one")
        out = np.zeros(len(queries), dtype=np.float32)
        for start in range(0, len(queries), batch_size):
            batch = self.tokenizer(queries[start:start + batch_size], passages[start:start + batch_size],
                                   padding=True, truncation="longest_first", max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            out[start:start + batch_size] = self.model(**batch).logits[:, 0].float().cpu().numpy()
        return out

    def score_lists(self, queries: list[str], passages: list[list[str]]) -> list[np.ndarray]:
        """Logits for each query against its own candidate passages.

        The INT8 model quantizes activations per batch, so there each query's list is its own batch: a
        player's answer must not depend on who else was in the batch.
        """
        if self.quantized:
            return [self.score([q] * len(p), p) if p else np.zeros(0, dtype=np.float32)
                    for q, p in zip(queries, passages)]
        flat = self.score([q for q, p in zip(queries, passages) for _ in p], [x for p in passages for x in p])
        bounds = np.cumsum([0] + [len(p) for p in passages])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
