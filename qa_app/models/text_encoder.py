"""The text bi-encoder: all-MiniLM-L6-v2, mean pooling over real tokens, L2-normalised, 384-d."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertModel

from qa_app.models.loading import pick_device, resolve_model

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where mask is 1. hidden: [batch, tokens, dim], mask: [batch, tokens]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class TextEncoder:
    """Sentence embeddings in the space that the KB index, the ranker's recall and speech share."""

    def __init__(self, model: str = DEFAULT_TEXT_ENCODER, device: str = "auto", max_length: int = 128) -> None:
        source = resolve_model(model)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = BertModel.from_pretrained(source, add_pooling_layer=False, dtype=torch.float32).eval().to(self.device)
        if self.device.type == "cuda":
            self.model.half()
        self.name = str(model)
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """Unit-length float32 embeddings, [len(texts), dim]."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            chunk = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1)
            out[chunk] = pooled.cpu().numpy()
        return out
