"""The cross-encoder ranker: a BERT-family model reading (player question, KB question) together.

It starts from the MiniLM weights and is trained by ``qa-app train-ranker``; its single output logit says
how likely the KB question asks the same thing as the player. The shipped weights are fp16; on CPU they
are run in fp32 (CPU half-precision GEMMs are slow) or with dynamic INT8 Linear layers, on CUDA in fp16.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from qa_app.models.cuda_graphs import GraphedForward
from qa_app.models.fast_encoders import FastBert, pack_token_rows
from qa_app.models.loading import pad_encodings, pick_device, quantize_for_cpu, resolve_model

DEFAULT_RANKER = "ranker-l3"  # distilled from "ranker" (6 layers): as accurate, half the GPU time


class Ranker:
    def __init__(self, model: str = DEFAULT_RANKER, device: str = "auto", max_length: int = 64,
                 cpu_int8: bool = False, cuda_graphs: bool = False, fast_kernels: bool = True) -> None:
        """On a CUDA device, fast_kernels runs the FP16 Triton encoder over packed pairs (see TextEncoder)."""
        source = resolve_model(model)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # A fast tokenizer sets its truncation state on each call: threads must not overlap ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self.model = BertForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
        self.model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model.half()
        self.quantized = self.device.type == "cpu" and cpu_int8
        if self.quantized:
            self.model = quantize_for_cpu(self.model)
        self.max_length = max_length
        self.source = source
        self.fast = FastBert(self.model.bert) if fast_kernels and self.device.type == "cuda" else None
        self._forward = self._logits_packed if self.fast else self._logits
        if cuda_graphs and self.device.type == "cuda":
            self._forward = GraphedForward(self._forward, self.device, f"ranker {model}",
                                           packed_max_len=self.model.config.max_position_embeddings if self.fast else None)

    def _logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask).logits[:, 0].float()

    def _logits_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
                       seq_start: torch.Tensor, seq_len: torch.Tensor, max_len: int) -> torch.Tensor:
        hidden = self.fast(input_ids, position_ids, seq_start, seq_len, max_len, token_type_ids=token_type_ids)
        pooled = self.model.bert.pooler(hidden[seq_start].unsqueeze(1))  # each pair's [CLS] token
        return self.model.classifier(pooled)[:, 0].float()

    def warm_up(self) -> None:
        """Capture the CUDA graphs of small batches before serving."""
        if isinstance(self._forward, GraphedForward):
            keys = (["input_ids", "position_ids", "token_type_ids", "seq_start", "seq_len"] if self.fast
                    else ["input_ids", "token_type_ids", "attention_mask"])
            self._forward.warm_up(keys)

    def tokenize(self, queries: list[str], passages: list[str]) -> list[dict[str, list[int]]]:
        """One encoding (input_ids, token_type_ids) per (query, passage) pair, unpadded: the CPU half of
        ``score``."""
        if len(queries) != len(passages):
            raise ValueError("queries and passages must pair up one to one")
        if not queries:
            return []
        with self._tokenizer_lock:
            encoded = self.tokenizer(queries, passages, truncation="longest_first", max_length=self.max_length,
                                     return_attention_mask=False)
        return [{"input_ids": ids, "token_type_ids": types}
                for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]

    @torch.inference_mode()
    def score_encoded(self, pairs: list[dict[str, list[int]]]) -> np.ndarray:
        """One forward pass over tokenised pairs: one logit each, float32 [len(pairs)]."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        if self.fast:
            batch = pack_token_rows(pairs, self.device)
            return self._forward(max_len=max(len(p["input_ids"]) for p in pairs), **batch).cpu().numpy()
        batch = pad_encodings(pairs, self.tokenizer.pad_token_id, self.device)
        return self._forward(**batch).cpu().numpy()

    def score(self, queries: list[str], passages: list[str], batch_size: int = 64) -> np.ndarray:
        """One logit per (query, passage) pair, float32 [len(queries)]."""
        pairs = self.tokenize(queries, passages)
        return np.concatenate([np.zeros(0, dtype=np.float32)] + [self.score_encoded(pairs[start:start + batch_size])
                                                                  for start in range(0, len(pairs), batch_size)])

    def score_lists(self, queries: list[str], passages: list[list[str]]) -> list[np.ndarray]:
        """Logits for each query against its own candidate passages."""
        return self.score_encoded_lists([self.tokenize([q] * len(p), p) for q, p in zip(queries, passages)])

    def score_encoded_lists(self, lists: list[list[dict[str, list[int]]]]) -> list[np.ndarray]:
        """Logits for several players' tokenised pair lists.

        The INT8 model quantizes activations per forward pass (one scale for the whole batch), so there each
        list is its own pass: a player's answer must not depend on who else was in the batch. Other models
        score every list in one pass.
        """
        if self.quantized:
            return [self.score_encoded(pairs) for pairs in lists]
        flat = self.score_encoded([pair for pairs in lists for pair in pairs])
        bounds = np.cumsum([0] + [len(pairs) for pairs in lists])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
