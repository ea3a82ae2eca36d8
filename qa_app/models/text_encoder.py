"""The text bi-encoder: all-MiniLM-L6-v2, mean pooling over real tokens, L2-normalised, 384-d."""
from __future__ import annotations

import threading

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertModel

from qa_app.models.cuda_graphs import GraphedForward
from qa_app.models.fast_encoders import FastBert, pack_token_rows
from qa_app.kernels.pooling import mean_pool as mean_pool_packed
from qa_app.models.loading import pad_encodings, pick_device, resolve_model

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where mask is 1. hidden: [batch, tokens, dim], mask: [batch, tokens]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class TextEncoder:
    """Sentence embeddings in the space that the KB index, the ranker's recall and speech share."""

    def __init__(self, model: str = DEFAULT_TEXT_ENCODER, device: str = "auto", max_length: int = 128,
                 cuda_graphs: bool = False, fast_kernels: bool = True) -> None:
        """On a CUDA device: fast_kernels runs the FP16 Triton encoder over packed, padding-free tokens instead
        of the transformers model (kept as the reference); cuda_graphs replays the forward pass from CUDA
        graphs (the serving fast path)."""
        source = resolve_model(model)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # A fast tokenizer sets its truncation state on each call: threads must not overlap ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self.model = BertModel.from_pretrained(source, add_pooling_layer=False, dtype=torch.float32).eval().to(self.device)
        if self.device.type == "cuda":
            self.model.half()
        self.name = str(model)
        self.max_length = max_length
        self.dim = self.model.config.hidden_size
        self.fast = FastBert(self.model) if fast_kernels and self.device.type == "cuda" else None
        self._forward = self._embed_packed if self.fast else self._embed
        if cuda_graphs and self.device.type == "cuda":
            self._forward = GraphedForward(self._forward, self.device, f"text encoder {model}",
                                           packed_max_len=self.model.config.max_position_embeddings if self.fast else None)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [rows, tokens, dim]
        return torch.nn.functional.normalize(mean_pool(hidden.float(), attention_mask), dim=-1)

    def _embed_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_start: torch.Tensor,
                      seq_len: torch.Tensor, max_len: int) -> torch.Tensor:
        hidden = self.fast(input_ids, position_ids, seq_start, seq_len, max_len)  # [tokens, dim]
        return mean_pool_packed(hidden, seq_start, seq_len)

    def warm_up(self) -> None:
        """Capture the CUDA graphs of small batches before serving."""
        if isinstance(self._forward, GraphedForward):
            keys = ["input_ids", "position_ids", "seq_start", "seq_len"] if self.fast else ["input_ids", "attention_mask"]
            self._forward.warm_up(keys)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated, unpadded: the CPU half of ``encode``."""
        with self._tokenizer_lock:
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    @torch.inference_mode()
    def encode_tokens(self, rows: list[list[int]]) -> np.ndarray:
        """One forward pass over tokenised texts: unit-length float32 embeddings, [len(rows), dim]."""
        if self.fast:
            batch = pack_token_rows([{"input_ids": r} for r in rows], self.device)
            return self._forward(max_len=max(map(len, rows)), **batch).cpu().numpy()
        batch = pad_encodings([{"input_ids": r} for r in rows], self.tokenizer.pad_token_id, self.device)
        return self._forward(**batch).cpu().numpy()

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """Unit-length float32 embeddings, [len(texts), dim]."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows = self.tokenize(texts) if texts else []
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(rows[i]))
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            chunk = order[start:start + batch_size]
            out[chunk] = self.encode_tokens([rows[i] for i in chunk])
        return out
